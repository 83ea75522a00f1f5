"""Bytes each rank sends per training step through collectives: FSDP2 vs expert parallelism (EP), measured and computed.

    python benchmarks/comm_volume.py               # measured: 2- and 4-rank fits (gloo, CPU), FSDP2 vs EP; + computed
    python benchmarks/comm_volume.py --tiny        # the same on a few short steps (a smoke run)
    python benchmarks/comm_volume.py --computed    # computed only: DeepSeek-V2-Lite / V3 on 8/16/64 GPUs (no run)
    python benchmarks/comm_volume.py --write-doc   # rewrite docs/planning.md's computed section (no run)
    python benchmarks/comm_volume.py --check       # exit 1 when it differs (tests/test_comm_volume.py)

**Measured.** Each rank is this script re-launched by Lightning in "rank" mode: before anything else is imported
it wraps torch.distributed's collectives (``all_gather_single`` / ``all_gather_into_tensor``,
``reduce_scatter_single`` / ``reduce_scatter_tensor``, ``all_reduce``, ``all_to_all_single``, ``broadcast``,
``all_gather``, the object collectives) and the functional collectives' ops (``torch.ops._c10d_functional.*``:
DTensor's and ``all_to_all_single_autograd``'s, forward and backward), then runs ``esft fit``. FSDP2 issues its
all-gathers and reduce-scatters through ``dist.all_gather_single`` / ``dist.reduce_scatter_single``
(torch/distributed/fsdp/_fully_shard/_fsdp_collectives.py), EP its token all-to-alls through
``all_to_all_single_autograd`` (whose backward calls ``torch.ops._c10d_functional.all_to_all_single`` again).
Only steady-state steps count: from the start of step 1 to the end of the last step (loading, profiling, step 0
and the end of the fit excluded), divided by their number. Both strategies fit the same model (the quickstart's
embedded Qwen3-MoE: 32 experts, top-4), the same per-rank micro-batch and the same fixed expert selection.

**What "sent" means** (bytes a rank puts on the wire under the ring / direct algorithms, the usual bus-bandwidth
accounting): all-gather (N-1) x its input shard; reduce-scatter (N-1)/N x its input; all-reduce 2 (N-1)/N x the
tensor; all-to-all the rows it sends to the other ranks; broadcast the tensor, on its source; object collectives
the pickled bytes, like their tensor counterparts. N is the collective's group size.

**Computed** (no run, ``computed``): the model built on the meta device from its config.json with the ESFT
selection applied (ESFT-Token top_p 0.2 as its bound, ceil(0.2 x E) experts per MoE layer, fp32 trainable
copies), bf16 weights and compute (``fsdp_bf16``: all-gathers in bf16, reduce-scatters in fp32). FSDP2 all-gathers
every decoder layer twice (forward, and again in backward: ``reshard_after_forward``) and the root group
(embeddings, norm, head) once; it reduce-scatters the trainable gradients once. EP over N = all ranks keeps E/N
whole experts per rank (no expert weight or expert gradient travels: each expert's FSDP2 group is its one owner)
and sends tokens: per MoE layer 2 all-to-alls in forward (dispatch, combine) and 2 in backward, each
tokens x top_k x hidden x 2 bytes x (N-1)/N (routing balanced over the ranks), plus the per-expert token counts
(the first MoE layer's dispatch has no backward when nothing before it trains, ESFT's default: 3 there);
the non-expert weights are FSDP2 over all ranks as above.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # `python benchmarks/comm_volume.py` from anywhere, nothing installed
    sys.path.insert(0, str(REPO))
if str(REPO / "benchmarks") not in sys.path:  # (also when a test loads this file by path)
    sys.path.insert(0, str(REPO / "benchmarks"))

from comm_counter import KINDS, CommCounter  # noqa: E402

RANK_MODE = "--rank-mode"
MiB, GiB = 2**20, 2**30

# -- measured: counting inside each rank (comm_counter.CommCounter) -----------------------------------------------


def rank_main(argv: list[str]) -> None:
    """One rank: wrap the collectives, run `esft fit`, print the bytes sent per steady-state step."""
    counter = CommCounter()
    counter.install()  # before Lightning / esft_lightning import anything from torch.distributed

    from esft_lightning.cli import main
    from esft_lightning.module import ESFTModule

    marks: dict[str, Any] = {}
    batch_start, batch_end = ESFTModule.on_train_batch_start, ESFTModule.on_train_batch_end

    def on_start(self: ESFTModule, batch: Any, batch_idx: int) -> None:
        if self.global_step == 1 and "start" not in marks:  # step 0 (warm-up, lazy init) is not counted
            marks["start"] = dict(counter.sent)
            marks["calls"] = dict(counter.calls)
        batch_start(self, batch, batch_idx)

    def on_end(self: ESFTModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        batch_end(self, outputs, batch, batch_idx)
        if "start" in marks:
            marks["end"], marks["end_calls"], marks["steps"] = dict(counter.sent), dict(counter.calls), self.global_step

    ESFTModule.on_train_batch_start = on_start
    ESFTModule.on_train_batch_end = on_end
    main(argv)
    import torch.distributed as dist

    rank = dist.get_rank() if dist.is_initialized() else 0
    if "end" not in marks:
        print(f"COMM rank {rank}: fewer than 2 steps, nothing counted", flush=True)
        return
    steps = marks["steps"] - 1
    sent = {k: (marks["end"][k] - marks["start"][k]) / steps for k in KINDS}
    calls = {k: (marks["end_calls"][k] - marks["calls"][k]) / steps for k in KINDS}
    print(
        f"COMM rank {rank} steps {steps} " + " ".join(f"{k} {sent[k]:.0f}" for k in KINDS)
        + " calls " + " ".join(f"{k} {calls[k]:.1f}" for k in KINDS),
        flush=True,
    )  # fmt: skip


# The measured runs' selection: the embedded model has 4 MoE layers of 32 routed experts; top_p 0.2 selects at most
# ceil(0.2 x 32) = 7 of them, here spread over the owners as a real selection would be.
SELECTION = {layer: [round(i * 32 / 7) for i in range(7)] for layer in range(4)}


def write_config(tmp: Path, steps: int, seq: int, batch: int) -> Path:
    """The quickstart (its embedded model) for ``steps`` steps, one fixed selection, every output under ``tmp``."""
    import yaml

    from esft_lightning.selection.rules import ExpertConfig

    selection = tmp / "expert_cfg.json"
    ExpertConfig(SELECTION).save(selection)
    cfg = yaml.safe_load((REPO / "configs/quickstart.yaml").read_text())
    root = str(tmp / "run")
    select = cfg["trainer"]["callbacks"][0]
    select["init_args"].update(expert_config=str(selection))
    cfg["trainer"].update(
        max_steps=steps, limit_val_batches=0, enable_progress_bar=False, enable_checkpointing=False,
        default_root_dir=root, callbacks=[select], logger=False, log_every_n_steps=1,
    )  # fmt: skip
    cfg["trainer"].pop("val_check_interval", None)
    cfg["data"].update(seq_length=seq, batch_size=batch)
    for source in cfg["data"]["task"] + cfg["data"]["general"]:
        source["path"] = str(REPO / source["path"])
    path = tmp / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def run_fit(config: Path, tmp: Path, ranks: int, strategy: str) -> str:
    args = ["--config", str(REPO / "configs/fsdp.yaml")]
    if strategy == "ep":
        args = ["--config", str(REPO / "configs/ep.yaml"), f"--trainer.strategy.init_args.expert_parallel_size={ranks}"]
    cmd = [sys.executable, str(Path(__file__).resolve()), RANK_MODE, "fit", "--config", str(config), *args,
           "--trainer.accelerator=cpu", f"--trainer.devices={ranks}"]  # fmt: skip
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "ESFT_CACHE_DIR": str(tmp / "cache"), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, text=True)
    out = done.stdout + done.stderr
    if done.returncode != 0:
        sys.exit(out[-12000:])
    return out


def parse_counts(out: str, ranks: int) -> dict[str, float]:
    """Mean over the ranks of the bytes each sent per step, by kind (the ranks' lines of one fit's output)."""
    found = re.findall(r"COMM rank (\d+) steps \d+ " + " ".join(rf"{k} ([\d.]+)" for k in KINDS), out)
    if len(found) != ranks:
        raise SystemExit(f"expected {ranks} COMM lines, found {len(found)}:\n{out[-4000:]}")
    return {k: sum(float(row[1 + i]) for row in found) / ranks for i, k in enumerate(KINDS)}


def measure(ranks: list[int], steps: int, seq: int, batch: int) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        config = write_config(tmp, steps, seq, batch)
        for n in ranks:
            for strategy in ("fsdp2", "ep"):
                sent = parse_counts(run_fit(config, tmp, n, strategy), n)
                rows.append({"ranks": n, "strategy": strategy, **sent})
    return rows


# -- computed: the same quantities from a model's shapes ---------------------------------------------------------


def computed(
    model: Any, world: int, expert_parallel: int, tokens: int, compute_bytes: int, reduce_bytes: int | None = None
) -> dict[str, float]:
    """Bytes one rank sends per training step (one micro-batch of ``tokens`` tokens per rank), by kind.

    ``model``: with the ESFT selection applied (``selection_spec.apply``; meta device is fine). ``expert_parallel``
    1: FSDP2 over ``world`` ranks; N > 1: every MoE layer's routed experts split over N ranks (E/N each; the
    trainable copies of the selected experts on their owners: the rank owning the most is counted), FSDP2-sharded
    over the world / N ranks holding the same experts, the rest FSDP2 over the world. All-gathers move parameters
    in ``compute_bytes`` per element (the mixed-precision param dtype), reduce-scatters the trainable gradients in
    ``reduce_bytes`` (default: the parameter's own dtype). Shards are padded to ceil(rows / ranks) rows, as FSDP2
    pads them. The token all-to-alls assume routing balanced over the ranks ((N-1)/N of the pairs leave the rank).
    """
    from esft_lightning.experts.state import expert_config_of
    from esft_lightning.models import decoder_layers, find_moe_layers

    moe = {layer.index: layer for layer in find_moe_layers(model)}
    config = expert_config_of(model)
    local_rows: dict[int, int] = {}  # routed-expert tensors -> this rank's rows under expert parallelism
    for index, layer in moe.items():
        count = layer.num_experts // expert_parallel
        selected = config.experts.get(index, []) if config is not None else []
        owned = max(sum(1 for e in selected if e // count == owner) for owner in range(expert_parallel))
        for name, p in layer.experts.named_parameters():
            local_rows[id(p)] = owned if name.startswith("esft_") else count
    out = dict.fromkeys(KINDS, 0.0)

    def fsdp2(params: list[Any], ranks: int, gathers: int) -> None:
        """One FSDP2 unit over ``ranks`` ranks: ``gathers`` all-gathers, one reduce-scatter of trainable grads."""
        for p in params:
            rows = local_rows.get(id(p), p.shape[0] if p.dim() else 1) if expert_parallel > 1 else p.shape[0]
            shard = -(-rows // ranks) * (p[0].numel() if p.dim() else 1)
            out["all_gather"] += gathers * shard * compute_bytes * (ranks - 1)
            if p.requires_grad:
                out["reduce_scatter"] += shard * (reduce_bytes or p.element_size()) * (ranks - 1)

    in_layers: set[int] = set()
    for layer in decoder_layers(model):
        params = list(layer.parameters())
        in_layers.update(id(p) for p in params)
        routed = [p for p in params if id(p) in local_rows] if expert_parallel > 1 else []
        fsdp2(routed, world // expert_parallel, 2)  # the experts' own FSDP2 group: ranks holding the same experts
        # forward, and again in backward (reshard_after_forward)
        fsdp2([p for p in params if expert_parallel == 1 or id(p) not in local_rows], world, 2)
    fsdp2([p for p in model.parameters() if id(p) not in in_layers], world, 1)  # the root group: stays gathered
    if expert_parallel > 1:
        hidden = model.config.get_text_config().hidden_size
        leaving = (expert_parallel - 1) / expert_parallel
        for layer in moe.values():
            pairs = tokens * layer.top_k
            # dispatch + combine, forward and backward; the first MoE layer's dispatch has no backward when
            # nothing before it trains (its input needs no gradient): 3 there with ESFT's defaults
            count = 4 if layer.index != min(moe) or _trains_before(model, layer) else 3
            out["all_to_all"] += count * pairs * hidden * compute_bytes * leaving
            out["all_to_all"] += layer.num_experts * 8 * leaving  # the per-expert pair counts (int64), forward
    return out


def _trains_before(model: Any, layer: Any) -> bool:
    """Whether a trainable parameter acts on the hidden states before ``layer``'s routed experts (embeddings,
    earlier layers, this layer's attention, norms and router; not its experts or shared experts)."""
    from esft_lightning.models import decoder_layers

    layers = list(decoder_layers(model))
    block = {id(p) for p in layer.block.parameters()}
    before = list(model.get_input_embeddings().parameters()) + [
        p for x in layers[: layer.index] for p in x.parameters()
    ]
    before += [p for p in layers[layer.index].parameters() if id(p) not in block]
    before += list(layer.router.parameters()) if layer.router is not None else []
    return any(p.requires_grad for p in before)


DOC_MODELS = ("DeepSeek-V2-Lite", "DeepSeek-V3")
DOC_WORLDS = (8, 16, 64)
SEQ, MICRO = 4096, 1
START, END = "<!-- comm-table:start -->", "<!-- comm-table:end -->"
ASSUMPTIONS = (
    f"Per rank and training step (one micro-batch of {MICRO} x {SEQ} tokens per rank, no activation "
    "checkpointing), bf16 weights and compute (`fsdp_bf16`: all-gathers in bf16, gradient reduce-scatters in "
    "fp32), ESFT-Token top_p 0.2 as its bound (ceil(0.2 x E) experts per MoE layer, fp32 trainable copies). "
    "FSDP2: every GPU one FSDP2 rank; EP: expert_parallel_size = all GPUs (E/N whole experts per GPU), the "
    "non-expert weights FSDP2 over all GPUs; all-to-all with routing balanced over the GPUs. GiB sent per GPU."
)


def doc_rows() -> list[dict]:
    from esft_lightning.pipeline import apply
    from esft_lightning.planning.plan import build_meta_model, selection_bound
    from esft_lightning.selection.spec import SelectionSpec

    rows = []
    for name in DOC_MODELS:
        model = build_meta_model(model=str(REPO / "configs/models" / name), dtype="bfloat16")
        spec = SelectionSpec(top_p=0.2)
        apply(model, selection_bound(model, spec)[0], spec)
        for world in DOC_WORLDS:
            for strategy, ep in (("FSDP2", 1), ("EP", world)):
                sent = computed(model, world, ep, MICRO * SEQ, 2, 4)
                rows.append({"model": name, "ranks": world, "strategy": strategy, **sent})
    return rows


def table(rows: list[dict], unit: float, unit_name: str, first: str = "model") -> str:
    head = [first] if first else []
    lines = [
        "| " + " | ".join(head + ["ranks", "strategy", f"param all-gather {unit_name}", f"grad reduce-scatter "
                                  f"{unit_name}", f"all-to-all tokens {unit_name}", f"other {unit_name}",
                                  f"total {unit_name}"]) + " |",
        "| --- " * (len(head) + 7) + "|",
    ]  # fmt: skip
    digits = 2 if unit == MiB else 1
    for r in rows:
        cells = [r[first]] if first else []
        cells += [str(r["ranks"]), r["strategy"]]
        cells += ["-" if math.isnan(r[k]) else f"{r[k] / unit:.{digits}f}" for k in KINDS]  # -: not modelled
        cells.append(f"{sum(r[k] for k in KINDS if not math.isnan(r[k])) / unit:.{digits}f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def section(rows: list[dict]) -> str:
    return f"{START}\n{ASSUMPTIONS}\n\n{table(rows, GiB, 'GiB')}\n{END}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="3 steps of 2 x 32 tokens per rank: a smoke run")
    parser.add_argument("--ranks", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--steps", type=int, default=None, help="training steps (the first is not counted)")
    parser.add_argument("--seq", type=int, default=None, help="tokens per sequence")
    parser.add_argument("--batch", type=int, default=None, help="sequences per rank per step")
    parser.add_argument("--computed", action="store_true", help="the computed table only (no run)")
    parser.add_argument("--write-doc", action="store_true", help="rewrite docs/planning.md's computed section")
    parser.add_argument("--check", action="store_true", help="exit 1 when docs/planning.md's section differs")
    args = parser.parse_args()
    steps = args.steps or (3 if args.tiny else 6)
    seq, batch = args.seq or (32 if args.tiny else 256), args.batch or (2 if args.tiny else 8)
    if not (args.computed or args.write_doc or args.check):
        rows = measure(args.ranks, steps, seq, batch)
        expected = _expected_for_measured(rows, seq * batch)
        print(
            f"measured: MiB sent per rank per training step (mean over ranks, steps 1..{steps - 1}; step 0 not "
            f"counted), quickstart's embedded model (fp32), {batch} x {seq} tokens per rank, gloo on CPU"
        )
        print(table(rows, MiB, "MiB", first=""))
        print("computed for the same runs (the formula below; all-to-all assumes balanced routing; other: -):")
        print(table(expected, MiB, "MiB", first=""))
        print()
    rows = doc_rows()
    doc = REPO / "docs/planning.md"
    text = doc.read_text()
    pattern = re.compile(re.escape(START) + ".*?" + re.escape(END), re.DOTALL)
    if not pattern.search(text):
        raise SystemExit(f"markers {START} ... {END} not found in {doc}")
    updated = pattern.sub(lambda _: section(rows), text)
    if args.check and updated != text:
        print("docs/planning.md's communication section differs: run python benchmarks/comm_volume.py --write-doc")
        sys.exit(1)
    if args.write_doc and updated != text:
        doc.write_text(updated)
    print("computed: " + ASSUMPTIONS)
    print(table(rows, GiB, "GiB"))


def _expected_for_measured(rows: list[dict], tokens: int) -> list[dict]:
    """The formula for the measured runs (the embedded model in fp32, its fixed selection); "other" not modelled."""
    from esft_lightning.pipeline import apply
    from esft_lightning.selection.rules import ExpertConfig
    from esft_lightning.selection.spec import SelectionSpec
    from esft_lightning.weights.loading import load_model

    out = []
    for r in rows:
        model = load_model(model="embedded", on_meta=True)
        apply(model, ExpertConfig(SELECTION), SelectionSpec())
        n = r["ranks"]
        sent = computed(model, n, n if r["strategy"] == "ep" else 1, tokens, 4, 4)
        sent["other"] = math.nan
        out.append({"ranks": n, "strategy": r["strategy"], **sent})
    return out


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == RANK_MODE:
        rank_main(sys.argv[2:])
    else:
        main()
