"""Task evaluation: eval sets, greedy generation, torchmetrics scores, and an LLM judge."""

from .evaluate import EvalSample, evaluate_set, exact_match, generate, load_eval_set, score
from .judge import Judge, JudgeConfig, JudgeError

__all__ = [
    "EvalSample",
    "Judge",
    "JudgeConfig",
    "JudgeError",
    "evaluate_set",
    "exact_match",
    "generate",
    "load_eval_set",
    "score",
]
