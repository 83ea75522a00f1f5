"""Counting the bytes one rank sends through torch.distributed collectives, by kind (benchmarks/comm_volume.py)."""

from __future__ import annotations

from typing import Any

KINDS = ("all_gather", "reduce_scatter", "all_to_all", "other")


class CommCounter:
    """Bytes this rank sends through collectives, by kind; ``install`` wraps torch.distributed's functions."""

    def __init__(self) -> None:
        self.sent = dict.fromkeys(KINDS, 0)
        self.calls = dict.fromkeys(KINDS, 0)
        self.reentrant = 0  # a wrapped collective calling another wrapped one counts once

    def add(self, kind: str, nbytes: float) -> None:
        self.sent[kind] += int(nbytes)
        self.calls[kind] += 1

    def install(self) -> None:
        import pickle

        import torch
        import torch.distributed as dist
        import torch.distributed._functional_collectives  # noqa: F401  (registers the ops' autograd first)
        import torch.distributed.distributed_c10d as c10d
        import torch.distributed.fsdp  # noqa: F401
        import torch.distributed.tensor  # noqa: F401

        def size(group: Any) -> int:
            return dist.get_world_size(group) if group is not None else dist.get_world_size()

        def nbytes(t: Any) -> int:
            return t.numel() * t.element_size() if torch.is_tensor(t) else 0

        def split_bytes(t: Any, splits: Any, n: int, rank: int) -> float:
            """Bytes of ``t`` (split on dim 0 by ``splits``, else evenly) that go to other ranks than ``rank``."""
            if not splits:
                return nbytes(t) * (n - 1) / n
            row = nbytes(t) / max(1, t.shape[0])
            return row * (sum(int(s) for s in splits) - int(splits[rank]))

        def wrap(owner: Any, name: str, kind: str, count: Any) -> None:
            original = getattr(owner, name, None)
            if original is None:
                return

            counter = self

            class Wrapped:
                """Counts, then calls ``original``; anything else (an op's ``.default``, ...) is the original's."""

                def __call__(self, *args: Any, **kwargs: Any) -> Any:
                    if counter.reentrant == 0:
                        try:
                            counter.add(kind, count(*args, **kwargs))
                        except Exception:  # never break a run over the accounting
                            counter.add(kind, 0)
                    counter.reentrant += 1
                    try:
                        return original(*args, **kwargs)
                    finally:
                        counter.reentrant -= 1

                def __getattr__(self, attr: str) -> Any:
                    return getattr(original, attr)

            setattr(owner, name, Wrapped())

        def arg(args: tuple, kwargs: dict, i: int, *names: str) -> Any:
            for key in names:
                if key in kwargs:
                    return kwargs[key]
            return args[i] if len(args) > i else None

        # torch.distributed (c10d): FSDP2, Lightning's reductions, the EP token counts, the adapter gather.
        def gather_single(*a: Any, **k: Any) -> float:
            return nbytes(arg(a, k, 1, "input_tensor")) * (size(arg(a, k, 2, "group")) - 1)

        def reduce_scatter_single(*a: Any, **k: Any) -> float:
            n = size(arg(a, k, 3, "group"))
            return nbytes(arg(a, k, 1, "input")) * (n - 1) / n

        def all_reduce(*a: Any, **k: Any) -> float:
            n = size(arg(a, k, 2, "group"))
            return 2 * nbytes(arg(a, k, 0, "tensor")) * (n - 1) / n

        def all_to_all(*a: Any, **k: Any) -> float:
            group = arg(a, k, 4, "group")
            n, rank = size(group), dist.get_rank(group)
            return split_bytes(arg(a, k, 1, "input"), arg(a, k, 3, "input_split_sizes"), n, rank)

        def broadcast(*a: Any, **k: Any) -> float:
            group = arg(a, k, 2, "group")
            src = arg(a, k, 1, "src")
            mine = src is None or dist.get_rank() == src
            return nbytes(arg(a, k, 0, "tensor")) if mine and size(group) > 1 else 0

        def gather_list(*a: Any, **k: Any) -> float:
            return nbytes(arg(a, k, 1, "tensor")) * (size(arg(a, k, 2, "group")) - 1)

        def gather_object(*a: Any, **k: Any) -> float:
            return len(pickle.dumps(arg(a, k, 1, "obj"))) * (size(arg(a, k, 2, "group")) - 1)

        def broadcast_objects(*a: Any, **k: Any) -> float:
            src = arg(a, k, 1, "src")
            mine = src is None or dist.get_rank() == src
            return len(pickle.dumps(arg(a, k, 0, "object_list"))) if mine else 0

        for name, kind, count in (
            ("all_gather_single", "all_gather", gather_single),
            ("all_gather_into_tensor", "all_gather", gather_single),
            ("_all_gather_base", "all_gather", gather_single),
            ("reduce_scatter_single", "reduce_scatter", reduce_scatter_single),
            ("reduce_scatter_tensor", "reduce_scatter", reduce_scatter_single),
            ("_reduce_scatter_base", "reduce_scatter", reduce_scatter_single),
            ("all_to_all_single", "all_to_all", all_to_all),
            ("all_reduce", "other", all_reduce),
            ("broadcast", "other", broadcast),
            ("all_gather", "other", gather_list),
            ("all_gather_object", "other", gather_object),
            ("broadcast_object_list", "other", broadcast_objects),
        ):
            wrap(dist, name, kind, count)
            if getattr(c10d, name, None) is not None and name.startswith("_"):
                wrap(c10d, name, kind, count)

        # Functional collectives (DTensor, all_to_all_single_autograd and its backward): the ops themselves.
        def group_size(name: Any) -> int:
            if isinstance(name, str):
                return c10d._get_group_size_by_name(name)
            return size(name)

        def group_rank(name: Any) -> int:
            group = c10d._resolve_process_group(name) if isinstance(name, str) else name
            return dist.get_rank(group)

        def f_gather(t: Any, n: int, group: Any, *_: Any) -> float:
            return nbytes(t) * (group_size(group) - 1)

        def f_gather_many(ts: Any, n: int, group: Any, *_: Any) -> float:
            return sum(nbytes(t) for t in ts) * (group_size(group) - 1)

        def f_reduce_scatter(t: Any, op: Any, n: int, group: Any, *_: Any) -> float:
            m = group_size(group)
            return nbytes(t) * (m - 1) / m

        def f_reduce_scatter_many(ts: Any, op: Any, n: int, group: Any, *_: Any) -> float:
            m = group_size(group)
            return sum(nbytes(t) for t in ts) * (m - 1) / m

        def f_all_reduce(t: Any, op: Any, group: Any, *_: Any) -> float:
            m = group_size(group)
            return 2 * nbytes(t) * (m - 1) / m

        def f_all_reduce_many(ts: Any, op: Any, group: Any, *_: Any) -> float:
            m = group_size(group)
            return 2 * sum(nbytes(t) for t in ts) * (m - 1) / m

        def f_all_to_all(t: Any, out_splits: Any, in_splits: Any, group: Any, *_: Any) -> float:
            return split_bytes(t, in_splits, group_size(group), group_rank(group))

        def f_broadcast(t: Any, src: Any, group: Any, *_: Any) -> float:
            return nbytes(t) if group_rank(group) == src else 0

        for namespace in ("_c10d_functional", "_c10d_functional_autograd"):
            ops = getattr(torch.ops, namespace)
            for name, kind, count in (
                ("all_gather_into_tensor", "all_gather", f_gather),
                ("all_gather_into_tensor_coalesced", "all_gather", f_gather_many),
                ("reduce_scatter_tensor", "reduce_scatter", f_reduce_scatter),
                ("reduce_scatter_tensor_coalesced", "reduce_scatter", f_reduce_scatter_many),
                ("all_to_all_single", "all_to_all", f_all_to_all),
                ("all_reduce", "other", f_all_reduce),
                ("all_reduce_coalesced", "other", f_all_reduce_many),
                ("broadcast", "other", f_broadcast),
            ):
                try:
                    getattr(ops, name)
                except (AttributeError, RuntimeError):
                    continue
                wrap(ops, name, kind, count)
