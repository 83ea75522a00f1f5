"""`esft profile --esft_logs` and `esft select --esft_logs | --scores`: scores and expert configs from files, no model.

ESFT users have profiled their tasks already (its ``expert_weights_<L>.txt`` routing logs); these commands turn those
logs into this project's scores JSON and select experts from them or from any scores JSON, without loading a model.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..files import atomic_write_text
from ..routing.esft_logs import read_esft_logs, round_scores
from ..routing.profile import SCORE_AVERAGINGS
from ..selection.rules import ExpertConfig, load_scores, select_experts
from ..selection.spec import PAPER_TOP_P

__all__ = ["FILE_OPTIONS", "profile_logs_main", "select_from_files_main", "wants_file_command"]

FILE_OPTIONS = ("--esft_logs", "--scores")
"""Options that make `esft profile` / `esft select` work from files instead of loading a model and its data."""


def wants_file_command(argv: list[str]) -> bool:
    """Whether ``argv`` names ESFT routing logs or a scores file (``--esft_logs DIR``, ``--scores=FILE``, ...)."""
    return any(arg == option or arg.startswith(option + "=") for arg in argv for option in FILE_OPTIONS)


def add_score_averaging_argument(parser: argparse.ArgumentParser, default: str | None) -> None:
    """``--score_averaging sequence|pooled``, worded the same on every command."""
    parser.add_argument(
        "--score_averaging",
        choices=SCORE_AVERAGINGS,
        default=default,
        help="sequence: mean per sequence, then over sequences (the paper's Eq. 6-7, the default); pooled: over "
        "all tokens at once (how ESFT's released expert configs were made)",
    )


def profile_logs_main(argv: list[str]) -> Path:
    """`esft profile --esft_logs DIR --out scores.json [--score_averaging pooled]`: ESFT's logs -> a scores JSON."""
    parser = argparse.ArgumentParser(
        prog="esft profile --esft_logs",
        description="Turn a folder of ESFT routing logs (expert_weights_<layer>.txt) into this project's scores JSON "
        "(token_scores / gate_scores per layer), for `esft select --scores` or `esft select --joint`.",
    )
    parser.add_argument("--esft_logs", required=True, metavar="DIR", help="folder of expert_weights_<layer>.txt")
    parser.add_argument("--out", required=True, help="output scores JSON")
    add_score_averaging_argument(parser, "sequence")
    parser.add_argument("--num_experts", type=int, default=None, help="default: the largest logged id + 1")
    parser.add_argument("--top_k", type=int, default=6, help="experts per token in the logs (DeepSeek-V2-Lite: 6)")
    ns = parser.parse_args(argv)
    profile = read_esft_logs(ns.esft_logs, ns.score_averaging, ns.num_experts, ns.top_k)
    out = Path(ns.out)
    atomic_write_text(out, json.dumps(profile.to_dict(), indent=1))
    print(
        f"{ns.score_averaging} scores of {len(profile.token_scores)} layers over {profile.num_tokens} tokens "
        f"({profile.num_sequences} sequences) written to {out}"
    )
    return out


def select_from_files_main(argv: list[str]) -> ExpertConfig:
    """`esft select --esft_logs DIR | --scores FILE --out expert_cfg.json`: top-p selection without a model."""
    parser = argparse.ArgumentParser(
        prog="esft select --esft_logs|--scores",
        description="Select experts from ESFT routing logs or a scores JSON (no model loaded). ESFT's released "
        "configs: --esft_logs DIR --score_averaging pooled --decimals 4.",
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--esft_logs", metavar="DIR", help="folder of ESFT's expert_weights_<layer>.txt")
    source.add_argument("--scores", metavar="FILE", help="a scores JSON (esft profile, expert_scores.json, ESFT's)")
    parser.add_argument("--out", required=True, help="output expert_cfg.json")
    parser.add_argument("--score_function", choices=["token", "gate"], default="token")
    parser.add_argument("--top_p", type=float, default=None, help="default: 0.2 token, 0.1 gate")
    add_score_averaging_argument(parser, None)
    parser.add_argument(
        "--decimals",
        type=int,
        default=None,
        help="round the scores first (4: as ESFT's summaries, which its released configs were selected from)",
    )
    parser.add_argument("--shared_experts", action="store_true")
    parser.add_argument("--non_expert_modules", action="store_true")
    ns = parser.parse_args(argv)
    meta: dict = {"score_function": ns.score_function}
    if ns.esft_logs:
        averaging = ns.score_averaging or "sequence"
        scores = read_esft_logs(ns.esft_logs, averaging).scores(ns.score_function)
        meta.update(score_averaging=averaging, scores_from=str(ns.esft_logs))
    else:
        if ns.score_averaging is not None:
            parser.error("--score_averaging applies to --esft_logs; a scores file is averaged already")
        scores = load_scores(ns.scores, ns.score_function)
        recorded = json.loads(Path(ns.scores).read_text()).get("score_averaging")
        meta.update(scores_from=str(ns.scores), **({"score_averaging": recorded} if recorded else {}))
    if ns.decimals is not None:
        scores = round_scores(scores, ns.decimals)
        meta["score_decimals"] = ns.decimals
    top_p = ns.top_p if ns.top_p is not None else PAPER_TOP_P[ns.score_function]
    config = select_experts(
        scores, top_p, shared_experts=ns.shared_experts, non_expert_modules=ns.non_expert_modules, meta=meta
    )
    config.save(ns.out)
    print(f"{config.num_selected} experts in {len(config.experts)} layers selected; config written to {ns.out}")
    return config
