"""Training step time of the reproducibility settings vs the default, and whether their weights agree bitwise.

One ESFT-Token (p=0.2) training step (forward + backward + AdamW + zero_grad) of the quickstart's model (the
shipped pretrained tiny Qwen3-MoE, batch 8 x 256 like configs/quickstart.yaml; ``--models`` adds the random
benchmark models of common.py) under:

  default                     the experts forward as shipped (index_select gathers: bitwise reproducible at a
                              fixed thread count)
  deterministic               + torch.use_deterministic_algorithms(True): what `trainer.deterministic: true` does
  MKL strict                  MKL_CBWR=AUTO,STRICT: MKL's GEMMs give the same bits with any thread count (an
                              environment variable, read when MKL loads)
  deterministic + MKL strict  both
  pre-fix x[index]            the gathers as before issue 17 (advanced indexing: its CPU backward adds with
                              atomics on several threads, not reproducible)
  pre-fix + deterministic     what reproducibility cost before the fix (index_put's sorting path)

Each variant is its own worker process (an environment variable has to be set before torch loads). The parent
has them step in interleaved rounds (order rotated every round), one worker at a time, so they never share the
cores. Every worker trains on the same batches in the same order, so the last column (a hash of the trained
tensors after all rounds) shows which settings give bitwise the same weights.
Run from the repo root: ``python benchmarks/determinism.py``.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import os
import subprocess
import sys
import tempfile
import time

from common import MODEL_CONFIGS, load_line, machine_line, median, print_table, random_batches, setup, spread, verdict

EMBEDDED = "embedded"
STRICT = {"MKL_CBWR": "AUTO,STRICT"}
VARIANTS: dict[str, tuple[dict[str, str], bool, bool]] = {  # name: (environment, deterministic, pre-fix gathers)
    "default": ({}, False, False),
    "deterministic": ({}, True, False),
    "MKL strict": (STRICT, False, False),
    "deterministic + MKL strict": (STRICT, True, False),
    "pre-fix x[index]": ({}, False, True),
    "pre-fix + deterministic": ({}, True, True),
}
TARGET = 1.10  # step time of a reproducibility setting / default
REPLY = "@@ "  # prefix of the worker's protocol lines on stdout (anything else there is ignored)


# -- worker: one variant ---------------------------------------------------------------------------------------
def build(args: argparse.Namespace):  # noqa: ANN201
    """Model with ESFT-Token p selected on random batches and applied, the training batches, AdamW."""
    import torch

    from esft_lightning.experts.split import apply_expert_config
    from esft_lightning.routing.profile import profile_routing
    from esft_lightning.selection.rules import select_experts
    from esft_lightning.weights.loading import load_model

    if args.model == EMBEDDED:
        model = load_model(EMBEDDED)
    else:
        from common import build_model

        model = build_model(args.model)
    model.train()
    vocab = min(256, model.config.vocab_size)
    profile = profile_routing(
        model, random_batches(4, args.batch_size, args.seq_length, seed=2, vocab=vocab), progress=False
    )
    config = select_experts(profile.token_scores, top_p=args.top_p)
    apply_expert_config(model, config)
    batches = random_batches(args.num_batches, args.batch_size, args.seq_length, seed=1, vocab=vocab)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=5e-3, betas=(0.9, 0.95), weight_decay=0.1)
    return model, config, batches, optimizer


def worker(args: argparse.Namespace) -> None:
    """Serve the parent: ``steps N`` -> the N step times; ``hash`` -> hash of the trained tensors; ``quit``."""
    import torch

    _, deterministic, prefix = VARIANTS[args.worker]
    if prefix:
        import esft_lightning.experts.forward as experts_forward

        experts_forward._rows = lambda x, index: x[index]  # the gathers as they were before issue 17
    torch.use_deterministic_algorithms(deterministic)
    model, config, batches, optimizer = build(args)
    cycle = itertools.cycle(batches)

    def step() -> float:
        start = time.perf_counter()
        b = next(cycle)
        out = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"], use_cache=False)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    def reply(value: object) -> None:
        print(REPLY + json.dumps(value), flush=True)

    selected = {str(k): len(v) for k, v in sorted(config.experts.items())}
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    reply({"threads": torch.get_num_threads(), "selected": selected, "trainable": trainable})
    for line in sys.stdin:
        command, *rest = line.split()
        if command == "steps":
            reply([step() for _ in range(int(rest[0]))])
        elif command == "hash":
            digest = hashlib.sha1()
            for name, p in sorted(model.named_parameters()):
                if p.requires_grad:
                    digest.update(name.encode() + p.detach().contiguous().numpy().tobytes())
            reply(digest.hexdigest()[:10])
        else:
            break


# -- parent: interleaved rounds ----------------------------------------------------------------------------------
class Worker:
    def __init__(self, name: str, args: argparse.Namespace, model: str) -> None:
        env_extra, _, _ = VARIANTS[name]
        self.name = name
        self.log = tempfile.TemporaryFile(mode="w+")
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", name, "--models", model]
        for option in ("batch_size", "seq_length", "num_batches", "top_p", "threads"):
            value = getattr(args, option)
            if value is not None:
                cmd += [f"--{option.replace('_', '-')}", str(value)]
        self.proc = subprocess.Popen(
            cmd,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.log,
            text=True,
            env={**os.environ, **env_extra},
        )

    def ask(self, command: str | None = None) -> object:
        if command is not None:
            self.proc.stdin.write(command + "\n")
            self.proc.stdin.flush()
        for line in self.proc.stdout:
            if line.startswith(REPLY):
                return json.loads(line[len(REPLY) :])
        self.log.seek(0)
        raise RuntimeError(f"worker {self.name!r} exited:\n{self.log.read()[-3000:]}")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.write("quit\n")
            self.proc.stdin.close()
            self.proc.wait(timeout=60)


def bench_model(model: str, args: argparse.Namespace) -> dict[str, float]:
    workers = {name: Worker(name, args, model) for name in args.variants}  # they build concurrently (untimed)
    try:
        infos = {name: w.ask() for name, w in workers.items()}
        info = infos[args.variants[0]]
        print(
            f"\n## {model}: ESFT-Token p={args.top_p}, experts selected per layer {info['selected']}, "
            f"{info['trainable']:,} trainable params; batch {args.batch_size} x {args.seq_length}, "
            f"{info['threads']} threads; {args.rounds} rounds of {args.steps} steps per variant after "
            f"{args.warmup} warm-up step(s)\n"
        )
        names = list(workers)
        for name in names:
            workers[name].ask(f"steps {args.warmup}")
        times: dict[str, list[float]] = {name: [] for name in names}
        for r in range(args.rounds):
            for name in names[r % len(names) :] + names[: r % len(names)]:
                times[name] += workers[name].ask(f"steps {args.steps}")
        hashes = {name: w.ask("hash") for name, w in workers.items()}
    finally:
        for w in workers.values():
            w.close()
    base = median(times["default"]) if "default" in times else None
    rows, ratios = [], {}
    for name in names:
        ratio = median(times[name]) / base if base else float("nan")
        ratios[name] = ratio
        rows.append(
            [
                name,
                f"{median(times[name]) * 1e3:.1f}",
                spread([t * 1e3 for t in times[name]], ".1f"),
                f"{ratio:.3f}",
                hashes[name],
            ]
        )
    print_table(["variant", "step ms (median)", "IQR ms", "/ default", "trained tensors (sha1)"], rows)
    print()
    for name in ("deterministic", "deterministic + MKL strict", "MKL strict"):
        if name in ratios:
            print(f"{name} / default step time: {ratios[name]:.3f}  {verdict(ratios[name], TARGET, False)}")
    if {"default", "deterministic"} <= set(hashes):
        same = hashes["default"] == hashes["deterministic"]
        print(f"default and deterministic trained bitwise the same: {'yes' if same else 'NO'}")
    return ratios


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=[EMBEDDED], choices=[EMBEDDED, *MODEL_CONFIGS])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-length", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=8, help="interleaved rounds")
    parser.add_argument("--steps", type=int, default=4, help="timed steps per variant per round")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per variant first")
    parser.add_argument("--num-batches", type=int, default=4, help="distinct training batches, cycled")
    parser.add_argument("--top-p", type=float, default=0.2)
    parser.add_argument("--threads", type=int, default=None, help="default: torch's (the physical cores)")
    parser.add_argument("--worker", choices=list(VARIANTS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    setup(args.threads)
    if args.worker:
        args.model = args.models[0]
        worker(args)
        return
    if "default" not in args.variants:
        args.variants.insert(0, "default")
    print(f"# determinism: {machine_line()}")
    results = {model: bench_model(model, args) for model in args.models}
    print("\n## summary (step time / default, medians of the same run)")
    names = [n for n in args.variants if n != "default"]
    print_table(["model", *names], [[m, *(f"{r[n]:.3f}" for n in names)] for m, r in results.items()])


if __name__ == "__main__":
    main()
    if "--worker" not in sys.argv:
        print(f"\n# end: {load_line()}")
