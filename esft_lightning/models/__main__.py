"""``python -m esft_lightning.models --markdown``: print the supported-families table (docs/families.md)."""

import argparse

from .table import families_markdown, family_rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--markdown", action="store_true", help="the whole docs/families.md page")
    args = parser.parse_args()
    if args.markdown:
        print(families_markdown(), end="")
    else:
        for row in family_rows():
            print(" ".join(cell.strip("`") for cell in row[:3]))


if __name__ == "__main__":
    main()
