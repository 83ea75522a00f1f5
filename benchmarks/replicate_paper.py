"""The ESFT paper in miniature: routing concentration, task overlap and fine-tuning methods compared, on CPU.

    python benchmarks/replicate_paper.py            # about 18 minutes on 2 CPU cores; writes docs/replication/
    python benchmarks/replicate_paper.py --quick    # the same tables from a few steps (a few minutes), for CI

On the shipped pretrained tiny MoE (esft_lightning/resources/pretrained, pretrained on six general synthetic
domains) and new tasks it never saw (esft_lightning/synthetic.py):
1. profiles each task and each general domain and plots how much of a layer's routing its top-n experts carry
   (the paper's Figure 2) and how much the ESFT-Token selections of different tasks overlap (Figure 3);
2. fine-tunes each task, mixed 1:1 with general data, with full fine-tuning, ESFT-Token (p=0.2), ESFT-Gate
   (p=0.1), LoRA (PEFT, experts and attention), random experts (as many per layer as ESFT-Token) and frozen
   experts (only the non-expert modules train): same steps, data and seeds;
3. scores task and general ability by greedy generation (exact match), and reports trainable parameters, time
   per step, adapter bytes and how far training moved routing (Jensen-Shannon divergence of token scores);
4. puts the tasks' ESFT-Token adapters into one model and scores it on every task.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from common import expert_lora_targets
from torch import nn
from transformers import AutoModelForCausalLM

from esft_lightning import synthetic
from esft_lightning.adapters import load_adapters, save_adapter
from esft_lightning.callbacks.routing_drift import general_dataloader, js_divergence
from esft_lightning.data import ESFTDataModule, Source
from esft_lightning.evaluation import evaluate_set, load_eval_set
from esft_lightning.experts import apply_expert_config
from esft_lightning.models import find_moe_layers
from esft_lightning.resources import pretrained_path
from esft_lightning.routing import RoutingProfile, profile_routing
from esft_lightning.selection import ExpertConfig, no_experts, random_experts, select_experts
from esft_lightning.tokenizer import byte_tokenizer

REPO = Path(__file__).resolve().parents[1]
METHODS = ("fft", "esft_token", "esft_gate", "lora", "random", "frozen")
LABELS = {
    "base": "pretrained model (no fine-tuning)",
    "fft": "full fine-tuning",
    "esft_token": "ESFT-Token (p=0.2)",
    "esft_gate": "ESFT-Gate (p=0.1)",
    "lora": "LoRA r=8 (experts + attention)",
    "random": "random experts (ESFT-Token's count)",
    "frozen": "frozen experts (non-expert modules train)",
    "merged": "one model, every task's ESFT-Token adapter",
}
# Not tuned per method (no sweep fits the budget): ESFT-style runs use the quickstart's 5e-3, which learns the
# cipher task in 200 steps; full fine-tuning a 5x lower rate (it moves every weight, as the paper's recipes
# lower it for FFT relative to their per-parameter budget); LoRA 1e-2, the usual higher LoRA rate.
LEARNING_RATES = {"fft": 1e-3, "esft_token": 5e-3, "esft_gate": 5e-3, "lora": 1e-2, "random": 5e-3, "frozen": 5e-3}


def forever(loader: torch.utils.data.DataLoader) -> Iterator[dict[str, torch.Tensor]]:
    while True:
        yield from loader


def base_model() -> nn.Module:
    return AutoModelForCausalLM.from_pretrained(pretrained_path(), dtype=torch.float32)


def make_data(tmp: Path, task: str, args: argparse.Namespace, seed: int) -> tuple[ESFTDataModule, list, list]:
    """Task + general training data (1:1), the task's and the general eval sets."""
    general = sorted(synthetic.GENERAL_DOMAINS)
    task_path = synthetic.write_jsonl(tmp / f"{task}_train.jsonl", synthetic.chat_records(task, args.train_records))
    general_path = synthetic.write_jsonl(
        tmp / "general_train.jsonl", synthetic.mixed_records(general, args.train_records, split="finetune")
    )
    task_eval = synthetic.write_jsonl(tmp / f"{task}_eval.jsonl", synthetic.eval_records(task, args.eval_samples))
    general_eval = synthetic.write_jsonl(
        tmp / "general_eval.jsonl", synthetic.mixed_records(general, args.eval_samples, split="eval", kind="eval")
    )
    dm = ESFTDataModule(
        task=[Source(str(task_path), name=task)],
        general=[Source(str(general_path), name="general")],
        general_ratio=1.0,
        seq_length=args.seq_length,
        batch_size=args.batch_size,
        seed=seed,
        cache_dir=str(tmp / "cache"),
    )
    dm.tokenizer = byte_tokenizer()
    dm.setup("fit")
    return dm, load_eval_set(task_eval), load_eval_set(general_eval)


def profile(model: nn.Module, loader: torch.utils.data.DataLoader, max_tokens: int) -> RoutingProfile:
    return profile_routing(model, loader, max_tokens=max_tokens, progress=False)


def add_lora(model: nn.Module) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    attention = ["q_proj", "k_proj", "v_proj", "o_proj"]
    targets = expert_lora_targets(model)
    config = LoraConfig(r=8, lora_alpha=16, target_modules=attention, target_parameters=targets, lora_dropout=0.0)
    return get_peft_model(model, config)


def prepare(method: str, token: ExpertConfig, gate: ExpertConfig, seed: int) -> nn.Module:
    """A fresh pretrained model with exactly the method's parameters trainable."""
    model = base_model()
    num_experts = {layer.index: layer.num_experts for layer in find_moe_layers(model)}
    if method == "fft":
        model.requires_grad_(True)
    elif method == "lora":
        model = add_lora(model)
    else:
        config = {
            "esft_token": token,
            "esft_gate": gate,
            "random": random_experts(token, num_experts, seed=seed),
            "frozen": no_experts(num_experts, non_expert_modules=True),
        }[method]
        apply_expert_config(model, config)
    return model


def train(model: nn.Module, batches: Iterator, steps: int, lr: float) -> float:
    """AdamW (0.9, 0.95, wd 0.1), constant lr; returns the median seconds per step after 3 warm-up steps."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
    model.train()
    times = []
    for _ in range(steps):
        batch = next(batches)
        start = time.perf_counter()
        loss = model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            labels=batch["labels"],
            use_cache=False,
        ).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    return statistics.median(times[3:] or times)


def stored_bytes(method: str, model: nn.Module, folder: Path) -> int:
    """What a user keeps per task: the adapter folder (ESFT variants), the LoRA weights, or the whole model."""
    if method in ("esft_token", "esft_gate", "random", "frozen"):
        save_adapter(model, folder)
        return sum(f.stat().st_size for f in folder.iterdir())
    params = [p for p in model.parameters() if p.requires_grad or method == "fft"]
    return sum(p.numel() * p.element_size() for p in params)


def drift(model: nn.Module, before: RoutingProfile, loader: torch.utils.data.DataLoader, max_tokens: int) -> float:
    """Mean over layers of the JS divergence of token scores after training from those before."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    after = profile(inner, loader, max_tokens)
    return statistics.mean(js_divergence(before.token_scores[k], after.token_scores[k]) for k in before.token_scores)


def run_task(task: str, args: argparse.Namespace, tmp: Path, results: list[dict]) -> dict:
    """Profile ``task`` and fine-tune it with every method and seed; returns the task's ESFT-Token adapters."""
    adapters = {}
    for seed in range(args.seeds):
        torch.manual_seed(seed)
        dm, task_eval, general_eval = make_data(tmp / f"{task}-{seed}", task, args, seed)
        model = base_model()
        before_task = profile(model, dm.task_dataloader(), args.profile_tokens)
        before_general = profile(model, general_dataloader(dm), args.profile_tokens)
        token = select_experts(before_task.token_scores, top_p=0.2)
        gate = select_experts(before_task.gate_scores, top_p=0.1)
        if seed == 0:
            scores, _ = evaluate_set(model, dm.tokenizer, task_eval, args.max_new_tokens, args.eval_batch)
            general, _ = evaluate_set(model, dm.tokenizer, general_eval, args.max_new_tokens, args.eval_batch)
            results.append(
                dict(
                    task=task,
                    method="base",
                    seed=seed,
                    task_em=scores["exact_match"],
                    task_chrf=scores["chrf"],
                    general_em=general["exact_match"],
                )
            )
        for method in METHODS:
            torch.manual_seed(seed)
            model = prepare(method, token, gate, seed)
            trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
            step_s = train(model, forever(dm.train_dataloader()), args.steps, LEARNING_RATES[method])
            scores, _ = evaluate_set(model, dm.tokenizer, task_eval, args.max_new_tokens, args.eval_batch)
            general, _ = evaluate_set(model, dm.tokenizer, general_eval, args.max_new_tokens, args.eval_batch)
            folder = tmp / f"{task}-{seed}-{method}"
            row = dict(
                task=task,
                method=method,
                seed=seed,
                task_em=scores["exact_match"],
                task_chrf=scores["chrf"],
                general_em=general["exact_match"],
                trainable_params=trainable,
                step_s=step_s,
                stored_bytes=stored_bytes(method, model, folder),
                drift_task=drift(model, before_task, dm.task_dataloader(), args.profile_tokens),
                drift_general=drift(model, before_general, general_dataloader(dm), args.profile_tokens),
                experts=None
                if method not in ("esft_token", "esft_gate", "random")
                else model.esft_expert_config.num_selected,
            )
            results.append(row)
            print(json.dumps(row), flush=True)
            if method == "esft_token" and seed == 0:
                adapters[task] = (folder, task_eval)
    return adapters


def run_merged(adapters: dict, general_eval: list, args: argparse.Namespace, results: list[dict]) -> str:
    """Every task's ESFT-Token adapter in one model; scored on each task. Returns the overlap policy used."""
    model, policy = base_model(), "refuse"
    folders = [folder for folder, _ in adapters.values()]
    try:
        load_adapters(model, folders)
    except ValueError:
        policy = "average"  # the tasks share some experts: their trained values are averaged
        model = base_model()
        load_adapters(model, folders, overlap="average")
    tokenizer = byte_tokenizer()
    general, _ = evaluate_set(model, tokenizer, general_eval, args.max_new_tokens, args.eval_batch)
    for task, (_folder, task_eval) in adapters.items():
        scores, _ = evaluate_set(model, tokenizer, task_eval, args.max_new_tokens, args.eval_batch)
        results.append(
            dict(
                task=task,
                method="merged",
                seed=0,
                task_em=scores["exact_match"],
                task_chrf=scores["chrf"],
                general_em=general["exact_match"],
                overlap=policy,
            )
        )
    return policy


def routing_figures(args: argparse.Namespace, tmp: Path, out: Path) -> dict:
    """Figures 2 and 3 in miniature: top-n routing share per task and layer, and task x task selection overlap."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    model = base_model()
    tokenizer = byte_tokenizer()
    names = [*args.tasks, *sorted(synthetic.GENERAL_DOMAINS)]
    selections, shares = {}, {}
    for name in names:
        path = synthetic.write_jsonl(tmp / "profiles" / f"{name}.jsonl", synthetic.chat_records(name, 256))
        dm = ESFTDataModule(
            task=[Source(str(path), name=name)],
            general_ratio=0.0,
            seq_length=args.seq_length,
            batch_size=args.batch_size,
            cache_dir=str(tmp / "cache"),
        )
        dm.tokenizer = tokenizer
        scores = profile(model, dm.task_dataloader(), args.profile_tokens).token_scores
        selections[name] = select_experts(scores, top_p=0.2).experts
        shares[name] = {k: torch.sort(s, descending=True).values.cumsum(0)[:8].tolist() for k, s in scores.items()}
    layers = sorted(next(iter(shares.values())))
    num_experts = find_moe_layers(model)[0].num_experts
    fig, axes = plt.subplots(1, len(layers), figsize=(3.2 * len(layers), 3.2), sharey=True)
    for ax, layer in zip(axes, layers):
        for name in names:
            style = "-" if name in args.tasks else "--"
            ax.plot(range(1, 9), shares[name][layer], style, marker="o", ms=3, label=name)
        ax.plot(range(1, 9), [n / num_experts for n in range(1, 9)], ":", color="grey", label="uniform")
        ax.set_title(f"layer {layer}")
        ax.set_xlabel("top-n experts")
    axes[0].set_ylabel("share of the layer's routing (token scores)")
    axes[-1].legend(fontsize=7)
    fig.suptitle("How concentrated routing is: share carried by each task's top-n experts")
    fig.tight_layout()
    fig.savefig(out / "concentration.png", dpi=110)
    plt.close(fig)

    def jaccard(a: dict, b: dict) -> float:
        return statistics.mean(len(set(a[k]) & set(b[k])) / max(len(set(a[k]) | set(b[k])), 1) for k in a)

    matrix = [[jaccard(selections[a], selections[b]) for b in names] for a in names]
    fig, ax = plt.subplots(figsize=(6, 5))
    image = ax.imshow(matrix, vmin=0, vmax=1, cmap="viridis")
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right")
    ax.set_yticks(range(len(names)), names)
    for i in range(len(names)):
        for j in range(len(names)):
            ax.text(j, i, f"{matrix[i][j]:.2f}", ha="center", va="center", color="white", fontsize=7)
    fig.colorbar(image, label="overlap of ESFT-Token selections (Jaccard, mean over layers)")
    ax.set_title("Selected experts shared between tasks")
    fig.tight_layout()
    fig.savefig(out / "overlap.png", dpi=110)
    plt.close(fig)
    top6 = {n: statistics.mean(shares[n][k][5] for k in layers) for n in names}
    counts = {n: statistics.mean(len(v) for v in selections[n].values()) for n in names}
    return {
        "top6_share": top6,
        "experts_per_layer": counts,
        "overlap": dict(zip(names, matrix)),
        "uniform_top6": 6 / num_experts,
    }


def summarise(results: list[dict], tasks: list[str]) -> list[dict]:
    """One row per method: task scores per task (mean over seeds) and their mean, general score, costs."""
    rows = []
    for method in ("base", *METHODS, "merged"):
        mine = [r for r in results if r["method"] == method]
        if not mine:
            continue
        row = {"method": method, "label": LABELS[method]}
        for task in tasks:
            values = [r["task_em"] for r in mine if r["task"] == task]
            row[f"{task}_em"] = statistics.mean(values) if values else None
            row[f"{task}_em_sd"] = statistics.pstdev(values) if len(values) > 1 else None
            chrf = [r["task_chrf"] for r in mine if r["task"] == task]
            row[f"{task}_chrf"] = statistics.mean(chrf) if chrf else None
        row["task_em"] = statistics.mean(r["task_em"] for r in mine)
        row["general_em"] = statistics.mean(r["general_em"] for r in mine)
        for key in ("trainable_params", "step_s", "stored_bytes", "drift_task", "drift_general", "experts"):
            values = [r[key] for r in mine if r.get(key) is not None]
            row[key] = statistics.mean(values) if values else None
        rows.append(row)
    return rows


def table(rows: list[dict], tasks: list[str]) -> str:
    def cell(value: float | None, fmt: str) -> str:
        return "-" if value is None else format(value, fmt)

    head = [
        "method",
        *[f"{t} EM / chrF" for t in tasks],
        "task mean EM",
        "general EM",
        "trainable params",
        "s / step",
        "stored per task",
        "routing drift task / general (JS)",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for r in rows:
        per_task = []
        for t in tasks:
            sd = r.get(f"{t}_em_sd")
            em = cell(r[f"{t}_em"], ".3f") + ("" if sd is None else f" ± {sd:.3f}")
            per_task.append(f"{em} / {cell(r[f'{t}_chrf'], '.3f')}")
        stored = "-" if r["stored_bytes"] is None else f"{r['stored_bytes'] / 2**20:.2f} MiB"
        drift_cell = "-" if r["drift_task"] is None else f"{r['drift_task']:.4f} / {r['drift_general']:.4f}"
        lines.append(
            "| "
            + " | ".join(
                [
                    r["label"],
                    *per_task,
                    cell(r["task_em"], ".3f"),
                    cell(r["general_em"], ".3f"),
                    cell(r["trainable_params"], ",.0f"),
                    cell(r["step_s"], ".3f"),
                    stored,
                    drift_cell,
                ]
            )
            + " |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a few steps and samples: the table's shape, for CI")
    parser.add_argument("--tasks", nargs="+", default=["intent", "cipher"], choices=sorted(synthetic.TASK_DOMAINS))
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--train-records", type=int, default=2000)
    parser.add_argument("--eval-samples", type=int, default=64)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--eval-batch", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-length", type=int, default=256)
    parser.add_argument("--profile-tokens", type=int, default=16384)
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "replication")
    args = parser.parse_args()
    if args.quick:
        args.steps, args.seeds, args.train_records, args.eval_samples = 6, 1, 200, 8
        args.max_new_tokens, args.profile_tokens = 24, 2048
    torch.set_flush_denormal(True)
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    results: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        figures = routing_figures(args, tmp, args.out)
        adapters: dict = {}
        for task in args.tasks:
            adapters.update(run_task(task, args, tmp, results))
        general_eval = load_eval_set(tmp / f"{args.tasks[0]}-0" / "general_eval.jsonl")
        policy = run_merged(adapters, general_eval, args, results) if len(adapters) > 1 else None
    rows = summarise(results, args.tasks)
    minutes = (time.perf_counter() - started) / 60
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    report = {
        "settings": settings,
        "learning_rates": LEARNING_RATES,
        "figures": figures,
        "merge_overlap": policy,
        "rows": rows,
        "runs": results,
        "minutes": minutes,
    }
    (args.out / "results.json").write_text(json.dumps(report, indent=1))
    text = table(rows, args.tasks)
    (args.out / "table.md").write_text(text)
    print(text)
    print(f"merged adapters: overlap policy {policy}; {minutes:.1f} minutes; written to {args.out}")


if __name__ == "__main__":
    main()
