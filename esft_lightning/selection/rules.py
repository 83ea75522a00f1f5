"""Decide: turn per-layer expert scores into an expert config (top-p rule), and read/write ESFT's JSON."""

from __future__ import annotations

import json
import os
import random
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Union

import torch

from ..files import atomic_write_text

if TYPE_CHECKING:
    from ..routing.profile import RoutingProfile

Scores = Mapping[int, torch.Tensor | Sequence[float] | Mapping[Any, float]]
ExcludeItem = Union["ExpertConfig", str, os.PathLike]
Exclude = ExcludeItem | Sequence[ExcludeItem] | None
"""Experts no selection may take: expert configs, ``expert_cfg.json`` files or adapter directories (one or a list)."""
TaskScores = Union[Scores, "RoutingProfile", str, os.PathLike]
"""One task's scores: a layer -> scores mapping, a ``RoutingProfile``, or a scores JSON file (``esft profile``)."""
CONFIG_FILE = "expert_cfg.json"  # an adapter directory's selection (adapters.py imports this module, not vice versa)


class SelectionShortfall(ValueError):
    """A layer cannot reach its top_p without excluded (or, in joint selection, contested) experts."""


@dataclass
class ExpertConfig:
    """Which routed experts of which layer to train (ESFT's ``expert_cfg.json``, docs/design.md section 2)."""

    experts: dict[int, list[int]]
    """decoder-layer index -> routed-expert ids, in selection order."""
    shared_experts: bool = False
    """Also train the shared experts of every MoE layer."""
    non_expert_modules: bool = False
    """Also train everything outside routed and shared experts (attention, norms, routers, embeddings, head)."""
    meta: dict[str, Any] = field(default_factory=dict)
    """Extra fields written beside ESFT's (score_function, top_p, num_tokens, model_type); ESFT ignores them."""

    @property
    def num_selected(self) -> int:
        """Selected routed experts over all layers."""
        return sum(len(v) for v in self.experts.values())

    def to_dict(self) -> dict[str, Any]:
        """ESFT's JSON object: string layer keys, plus our extra fields."""
        experts = {str(k): [int(e) for e in v] for k, v in sorted(self.experts.items())}
        return {
            "experts": experts,
            "shared_experts": self.shared_experts,
            "non_expert_modules": self.non_expert_modules,
            **self.meta,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "expert config") -> ExpertConfig:
        """Validate and read ESFT's JSON object; errors name ``source`` and the offending key."""
        if not isinstance(data, Mapping) or "experts" not in data:
            raise ValueError(f"{source}: expected a JSON object with an 'experts' key")
        raw = data["experts"]
        if not isinstance(raw, Mapping):
            raise ValueError(f"{source}: 'experts' must map layer indices to lists of expert ids")
        experts: dict[int, list[int]] = {}
        for key, ids in raw.items():
            try:
                layer = int(key)
            except (TypeError, ValueError):
                raise ValueError(f"{source}: experts key {key!r} is not a layer index") from None
            if not isinstance(ids, list) or not all(type(e) is int and e >= 0 for e in ids):
                raise ValueError(f"{source}: experts[{key!r}] must be a list of non-negative ints, got {ids!r}")
            if len(set(ids)) != len(ids):
                raise ValueError(f"{source}: experts[{key!r}] lists an expert twice: {ids}")
            experts[layer] = list(ids)
        for flag in ("shared_experts", "non_expert_modules"):
            if not isinstance(data.get(flag, False), bool):
                raise ValueError(f"{source}: {flag!r} must be true or false, got {data[flag]!r}")
        meta = {k: v for k, v in data.items() if k not in ("experts", "shared_experts", "non_expert_modules")}
        return cls(experts, bool(data.get("shared_experts", False)), bool(data.get("non_expert_modules", False)), meta)

    def save(self, path: str | os.PathLike) -> None:
        """Write ESFT's JSON atomically (temp file + rename): a crash never leaves half a file."""
        atomic_write_text(Path(path), json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | os.PathLike) -> ExpertConfig:
        """Read an ``expert_cfg.json``; errors name the file (and line for malformed JSON)."""
        return cls.from_dict(_read_json(Path(path), "expert config"), source=str(path))


def _read_json(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_bytes().decode("utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} {path} does not exist") from None
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: not UTF-8 (byte {err.start}); {what}s are UTF-8 JSON") from None
    except RecursionError:
        raise ValueError(f"{path}: not valid JSON (nested too deeply)") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON (line {err.lineno}, column {err.colno}): {err.msg}") from None


def _as_tensor(layer: int, values: torch.Tensor | Sequence[float] | Mapping[Any, float]) -> torch.Tensor:
    if isinstance(values, Mapping):  # ESFT's score JSON: {"0": 0.01, "1": ...}
        ids = sorted(int(k) for k in values)
        if ids != list(range(len(ids))):
            raise ValueError(f"scores of layer {layer}: expert ids must be 0..N-1, got {ids[:5]}...")
        values = [float(values[str(i)] if str(i) in values else values[i]) for i in ids]
    scores = torch.as_tensor(values, dtype=torch.float64).flatten()
    if scores.numel() == 0 or not torch.isfinite(scores).all() or (scores < 0).any():
        raise ValueError(f"scores of layer {layer} must be a non-empty list of finite non-negative numbers")
    return scores


def select_experts(
    scores: Scores,
    top_p: float = 0.2,
    *,
    shared_experts: bool = False,
    non_expert_modules: bool = False,
    meta: Mapping[str, Any] | None = None,
    exclude: Exclude = None,
    strict: bool = True,
) -> ExpertConfig:
    """Per layer: experts by descending score (ties: lower id first) until the cumulative score >= top_p.

    The expert that crosses ``top_p`` is included (paper Eq. 8). ``scores`` maps layer -> scores per
    expert, as tensors, lists or ESFT's ``{"expert": score}`` tables.

    ``exclude``: expert configs (``ExpertConfig`` objects, ``expert_cfg.json`` files) or adapter directories whose
    experts must not be chosen, e.g. the adapters another task already trained; the next-best experts are taken
    instead, so each layer still reaches ``top_p`` where it can. When a layer cannot (the excluded experts held too
    much of its score), ``strict`` raises ``SelectionShortfall`` naming the layer and the score reached; with
    ``strict=False`` the layer keeps every expert left, a warning names it and ``meta["top_p_shortfall"]`` records
    the score it reached.
    """
    _check_top_p(top_p)
    excluded = load_exclusion(exclude)
    if (excluded.shared_experts and shared_experts) or (excluded.non_expert_modules and non_expert_modules):
        message = (
            "the excluded configs already train the shared experts or the non-expert modules, and this selection "
            "trains them too: those tensors cannot belong to two adapters"
        )
        if strict:
            raise ValueError(f"{message} (set shared_experts / non_expert_modules false, or pass strict=False)")
        warnings.warn(f"ESFT selection: {message}", stacklevel=2)
    table = {int(layer): _as_tensor(int(layer), values) for layer, values in scores.items()}
    _check_exclusion_fits(excluded, {layer: s.numel() for layer, s in table.items()})
    experts, shortfall = {}, {}
    for layer, s in table.items():
        chosen, lost = _assign_layer({"": s}, {"": top_p}, set(excluded.experts.get(layer, ())))
        experts[layer] = chosen[""]
        if lost:
            shortfall[layer] = lost[""]
    extra = {"top_p": top_p, **(meta or {})}
    if excluded.meta.get("sources"):
        extra["excluded_from"] = list(excluded.meta["sources"])
    if shortfall:
        lines = [_shortfall_line(None, layer, top_p, *shortfall[layer]) for layer in sorted(shortfall)]
        _shortfall_or_warn(strict, "; ".join(lines))
        extra["top_p_shortfall"] = {str(k): round(v[0], 6) for k, v in sorted(shortfall.items())}
    return ExpertConfig(experts, shared_experts, non_expert_modules, extra)


def select_disjoint(
    scores_by_task: Mapping[str, TaskScores],
    top_p: float | Mapping[str, float] = 0.2,
    *,
    score_function: str = "token",
    exclude: Exclude = None,
    strict: bool = True,
    meta: Mapping[str, Any] | None = None,
) -> dict[str, ExpertConfig]:
    """Select experts for several tasks at once so that no expert serves two tasks: adapters that compose.

    Per layer, every (task, expert) pair is taken by descending score (ties: the earlier task, then the lower
    expert id); a task takes an expert nobody holds until its cumulative score reaches its ``top_p``. A contested
    expert therefore goes to the task that scores it higher (of those still short of top_p) and the other task
    takes its next-best expert; a task that never meets a conflict selects exactly what ``select_experts`` would.
    The rule is greedy, not a search over every assignment.

    ``scores_by_task``: task name -> ``RoutingProfile``, layer -> scores mapping, or scores JSON file (``esft
    profile``'s, or ESFT's ``expert_scores/<task>.json``); ``score_function`` picks ``token`` or ``gate`` scores of
    profiles and files. ``top_p``: one value, or one per task. ``exclude``: experts no task may take (e.g. adapters
    already in the model). A task that cannot reach its top_p in some layer without contested or excluded experts
    raises ``SelectionShortfall`` naming task, layer, the score reached and the top_p wanted; ``strict=False``
    keeps what it could get, warns, and records ``meta["top_p_shortfall"]``. Returns task -> ``ExpertConfig``.
    Shared experts and non-expert modules are never selected here: every task would train the same tensors.
    """
    if not scores_by_task:
        raise ValueError("select_disjoint needs the scores of at least one task")
    tasks = [str(t) for t in scores_by_task]
    wanted = {t: float(top_p[t] if isinstance(top_p, Mapping) else top_p) for t in tasks}
    for task, p in wanted.items():
        _check_top_p(p, f"top_p of task {task!r}")
    tables = {str(t): _task_scores(str(t), v, score_function) for t, v in scores_by_task.items()}
    sizes: dict[int, int] = {}
    for task, table in tables.items():
        for layer, s in table.items():
            if sizes.setdefault(layer, s.numel()) != s.numel():
                raise ValueError(
                    f"layer {layer}: task {task!r} scores {s.numel()} experts, another task {sizes[layer]}; "
                    "joint selection needs profiles of the same model"
                )
    excluded = load_exclusion(exclude)
    _check_exclusion_fits(excluded, sizes)
    experts: dict[str, dict[int, list[int]]] = {t: {} for t in tasks}
    short: dict[str, dict[int, tuple[float, list[tuple[int, str]]]]] = {t: {} for t in tasks}
    for layer in sorted(sizes):
        here = {t: tables[t][layer] for t in tasks if layer in tables[t]}
        chosen, lost = _assign_layer(here, wanted, set(excluded.experts.get(layer, ())))
        for task in here:
            experts[task][layer] = chosen[task]
        for task, detail in lost.items():
            short[task][layer] = detail
    lines = [_shortfall_line(t, layer, wanted[t], *short[t][layer]) for t in tasks for layer in sorted(short[t])]
    if lines:
        _shortfall_or_warn(strict, "; ".join(lines))
    configs = {}
    for task in tasks:
        extra: dict[str, Any] = {"top_p": wanted[task], "score_function": score_function, "task": task}
        extra["disjoint_with"] = [t for t in tasks if t != task]
        if excluded.meta.get("sources"):
            extra["excluded_from"] = list(excluded.meta["sources"])
        if short[task]:
            extra["top_p_shortfall"] = {str(k): round(v[0], 6) for k, v in sorted(short[task].items())}
        configs[task] = ExpertConfig(experts[task], meta={**extra, **(meta or {})})
    return configs


def load_exclusion(exclude: Exclude) -> ExpertConfig:
    """The union of the experts (and flags) of ``exclude``: ``ExpertConfig`` objects, ``expert_cfg.json`` files,
    adapter directories (their ``expert_cfg.json``); ``meta["sources"]`` lists the files read."""
    if exclude is None:
        return ExpertConfig({})
    items = [exclude] if isinstance(exclude, (ExpertConfig, str, os.PathLike)) else list(exclude)
    union: dict[int, list[int]] = {}
    shared = non_expert = False
    sources: list[str] = []
    for item in items:
        if isinstance(item, ExpertConfig):
            config = item
            sources.extend(item.meta.get("sources", ()))  # an exclusion loaded before keeps naming its files
        else:
            path = Path(item)
            if path.is_dir():
                if not (path / CONFIG_FILE).is_file():
                    raise FileNotFoundError(
                        f"exclude: {path} is a directory without {CONFIG_FILE} (expected an adapter directory or "
                        "an expert config file)"
                    )
                path = path / CONFIG_FILE
            config = ExpertConfig.load(path)
            sources.append(str(item))
        for layer, ids in config.experts.items():
            union.setdefault(int(layer), []).extend(e for e in ids if e not in union.get(int(layer), ()))
        shared, non_expert = shared or config.shared_experts, non_expert or config.non_expert_modules
    return ExpertConfig(union, shared, non_expert, {"sources": sources})


def load_scores(path: str | os.PathLike, score_function: str = "token") -> dict[int, torch.Tensor]:
    """One score table (``token`` or ``gate``) of a scores JSON: ``esft profile``'s output, the callback's
    ``expert_scores.json``, or ESFT's ``expert_scores/<task>.json``. Errors name the file and key."""
    path = Path(path)
    return _score_table(_read_json(path, "scores file"), score_function, str(path))


def _score_table(data: Any, score_function: str, source: str) -> dict[int, torch.Tensor]:
    if score_function not in ("token", "gate"):
        raise ValueError(f"score_function must be 'token' or 'gate', got {score_function!r}")
    key = f"{score_function}_scores"
    if not isinstance(data, Mapping) or not isinstance(data.get(key), Mapping):
        raise ValueError(
            f"{source}: no {key!r} table (expected the scores JSON that `esft profile` writes, "
            '{"token_scores": {layer: {expert: score}}, "gate_scores": ...})'
        )
    table = {}
    for layer, values in data[key].items():
        try:
            index = int(layer)
        except (TypeError, ValueError):
            raise ValueError(f"{source}: {key} key {layer!r} is not a layer index") from None
        table[index] = _as_tensor(index, values)
    return table


def _task_scores(task: str, value: TaskScores, score_function: str) -> dict[int, torch.Tensor]:
    if isinstance(value, (str, os.PathLike)):
        return load_scores(value, score_function)
    if callable(getattr(value, "scores", None)):  # a RoutingProfile
        value = value.scores(score_function)
    elif isinstance(value, Mapping) and f"{score_function}_scores" in value:  # a scores JSON already parsed
        return _score_table(value, score_function, f"scores of task {task!r}")
    return {int(layer): _as_tensor(int(layer), values) for layer, values in value.items()}


def _assign_layer(
    scores: Mapping[str, torch.Tensor], top_p: Mapping[str, float], blocked: set[int]
) -> tuple[dict[str, list[int]], dict[str, tuple[float, list[tuple[int, str]]]]]:
    """One layer's selection for one or more tasks (the rule of ``select_disjoint``; one task and nothing blocked
    is exactly Eq. 8). Returns each task's experts in selection order, and for each task left below its top_p while
    experts with a positive score were out of its reach: (score reached, [(expert, "excluded" or its holder)])."""
    tasks = list(scores)
    values = {t: scores[t].tolist() for t in tasks}
    # One sorted walk over all pairs: within a task it is the task's own descending order (ties: lower id first).
    pairs = sorted((-v, i, e) for i, t in enumerate(tasks) for e, v in enumerate(values[t]))
    holder: dict[int, str] = {}
    chosen: dict[str, list[int]] = {t: [] for t in tasks}
    total = dict.fromkeys(tasks, 0.0)
    done: set[str] = set()
    for negative, i, e in pairs:
        task = tasks[i]
        if task in done or e in blocked or e in holder:
            continue
        holder[e] = task
        chosen[task].append(e)
        total[task] += -negative
        if total[task] >= top_p[task]:
            done.add(task)
    short = {}
    for task in tasks:
        if task in done:
            continue
        # A task short of top_p walked all its pairs, so each expert it lacks is blocked or held by another task.
        # Short only because the layer's scores run out is no shortfall (Eq. 8 then takes every expert).
        missed = [(e, "excluded" if e in blocked else holder[e]) for e, v in enumerate(values[task]) if v > 0]
        missed = [(e, who) for e, who in missed if who != task]
        if missed:
            short[task] = (total[task], missed)
    return chosen, short


def _shortfall_line(task: str | None, layer: int, top_p: float, reached: float, missed: list[tuple[int, str]]) -> str:
    where = f"layer {layer}" if task is None else f"task {task!r}, layer {layer}"
    lost = ", ".join(f"{e} ({'excluded' if who == 'excluded' else f'taken by {who!r}'})" for e, who in missed[:8])
    more = f" and {len(missed) - 8} more" if len(missed) > 8 else ""
    return f"{where}: reached a score of {reached:.4g}, top_p wants {top_p:g} (out of reach: experts {lost}{more})"


def _shortfall_or_warn(strict: bool, message: str) -> None:
    if strict:
        raise SelectionShortfall(
            f"{message}. Lower top_p, exclude fewer experts, or accept the shortfall with strict=False "
            "(esft select --best_effort; ExpertSelectionCallback(exclude_strict=False))"
        )
    warnings.warn(f"ESFT selection below top_p: {message}", stacklevel=3)


def _check_exclusion_fits(excluded: ExpertConfig, sizes: Mapping[int, int]) -> None:
    """An excluded expert the scores do not have means a config of another model: say so, do not ignore it."""
    origin = ", ".join(excluded.meta.get("sources") or ["the excluded config"])
    for layer, ids in excluded.experts.items():
        if not ids:
            continue
        if layer not in sizes:
            raise ValueError(
                f"exclude: {origin} name layer {layer}, which the scores do not have (MoE layers "
                f"{sorted(sizes)}): a config of another model?"
            )
        bad = [e for e in ids if e >= sizes[layer]]
        if bad:
            raise ValueError(f"exclude: {origin} name experts {bad} of layer {layer}, which has {sizes[layer]} experts")


def _check_top_p(top_p: float, what: str = "top_p") -> None:
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"{what} must be in (0, 1], got {top_p}")


def all_experts(num_experts: Mapping[int, int], exclude: Exclude = None, **flags: Any) -> ExpertConfig:
    """Baseline: every routed expert of every MoE layer (full fine-tuning of the experts), less ``exclude``'s."""
    excluded = load_exclusion(exclude).experts
    return ExpertConfig(
        {k: [e for e in range(n) if e not in excluded.get(k, ())] for k, n in num_experts.items()}, **flags
    )


def no_experts(num_experts: Mapping[int, int], **flags: Any) -> ExpertConfig:
    """Baseline: routed experts all frozen (with the flags, only shared / non-expert modules train)."""
    return ExpertConfig({k: [] for k in num_experts}, **flags)


def random_experts(
    like: ExpertConfig, num_experts: Mapping[int, int], seed: int = 0, exclude: Exclude = None
) -> ExpertConfig:
    """The paper's ablation: as many experts per layer as ``like`` selected, drawn uniformly at random (from the
    experts ``exclude`` leaves)."""
    rng = random.Random(seed)
    excluded = load_exclusion(exclude).experts
    allowed = {k: [e for e in range(n) if e not in excluded.get(k, ())] for k, n in num_experts.items()}
    chosen = {k: rng.sample(allowed[k], min(len(v), len(allowed[k]))) for k, v in like.experts.items()}
    return ExpertConfig(chosen, like.shared_experts, like.non_expert_modules, {**like.meta, "random_seed": seed})
