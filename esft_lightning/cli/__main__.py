"""``python -m esft_lightning.cli``: the `esft` command."""

from .dispatch import main

main()
