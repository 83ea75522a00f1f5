#!/usr/bin/env bash
# GPU check, one command, no network (about 5-8 minutes on one H100):
#   bash benchmarks/gpu_check.sh
# (a) saves a random bf16 model shaped like DeepSeek-V2-Lite (hidden 2048, 64 routed experts top-6 of width 1408,
#     2 shared, MLA attention, vocabulary 102400) but with 4 layers, to a temp directory;
# (b) runs `esft fit` from it for 20 steps with configs/fsdp.yaml on one GPU (FSDP2 over NCCL: rank-0 profiling on
#     the GPU, broadcast into shards), then the same single-device;
# (c) runs benchmarks/gpu.py (ESFT vs full fine-tuning tokens/s and peak memory, same model and batch, each next to
#     the memory plan: esft_lightning.planning total vs torch.cuda.max_memory_allocated);
# (d) writes the same model as DeepSeek-V3 ships it (block FP8, 128x128 blocks, weight_scale_inv) and runs the
#     single-device fit from that directory twice: frozen experts dequantized to bf16 (fp8) and kept 8-bit
#     (fp8-8bit: frozen_experts_dtype float8), the two rows to compare for tokens/s and peak GPU memory;
# (e) runs the single-device fit with AdamW's state in host memory (host-adamw: esft_lightning.optimizers.
#     HostOffloadAdamW), whose losses should equal `single`'s and whose peak GPU memory should be lower by about
#     the AdamW column of `single`;
# and prints one summary table. GPU_CHECK_TINY=1 shrinks everything and runs on the CPU (a smoke test of the script).
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
export ESFT_CACHE_DIR="$WORK/cache"
TINY=${GPU_CHECK_TINY:-0}
if [ "$TINY" = 1 ]; then ACCEL=cpu; STEPS=2; SEQ=64; else ACCEL=gpu; STEPS=20; SEQ=1024; fi

python - "$WORK/model" "$TINY" <<'EOF'
import sys, torch
from esft_lightning.models import build_tiny_model
tiny = sys.argv[2] == "1"
shape = dict(hidden_size=64, intermediate_size=128, moe_intermediate_size=32, vocab_size=1024) if tiny else dict(
    hidden_size=2048, intermediate_size=10944, moe_intermediate_size=1408, vocab_size=102400)
model = build_tiny_model(
    "deepseek_v2", num_hidden_layers=4, num_attention_heads=16, num_key_value_heads=16, n_routed_experts=64,
    num_experts_per_tok=6, n_shared_experts=2, first_k_dense_replace=1, kv_lora_rank=512, q_lora_rank=None,
    qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, topk_method="greedy", n_group=1, topk_group=1,
    norm_topk_prob=False, max_position_embeddings=4096, **shape)
model.to(torch.bfloat16).save_pretrained(sys.argv[1])
print(f"saved {sum(p.numel() for p in model.parameters()) / 1e9:.2f} B parameters (bf16) to {sys.argv[1]}")
EOF

fit() {  # $1: name, rest: extra arguments. The quickstart config with every output under $WORK/$name.
  local name=$1; shift
  python - "$WORK/$name" <<'PYEOF'
import os, sys, yaml
from pathlib import Path
root = Path(sys.argv[1]); root.mkdir(parents=True)
cfg = yaml.safe_load(Path("configs/quickstart.yaml").read_text())
cfg["trainer"]["default_root_dir"] = str(root)
if isinstance(cfg["trainer"].get("logger"), dict):
    cfg["trainer"]["logger"].setdefault("init_args", {})["save_dir"] = str(root)
for cb in cfg["trainer"].get("callbacks", []):
    if cb["class_path"].endswith("ModelCheckpoint"):
        cb.setdefault("init_args", {})["dirpath"] = str(root / "ckpt")
cfg["model"] = {}
for source in cfg["data"]["task"] + cfg["data"]["general"]:
    source["path"] = str(Path(source["path"]).resolve())
for cb in cfg["trainer"]["callbacks"]:  # FROZEN=float8: frozen experts kept 8-bit
    if cb["class_path"].endswith("ExpertSelectionCallback") and os.environ.get("FROZEN"):
        cb.setdefault("init_args", {})["frozen_experts_dtype"] = os.environ["FROZEN"]
if os.environ.get("OPTIMIZER"):  # OPTIMIZER=<class path> with ESFTModule's default AdamW's arguments (the other runs')
    args = {"lr": 1e-5, "betas": [0.9, 0.95], "weight_decay": 0.1}
    cfg["model"]["optimizer"] = {"class_path": os.environ["OPTIMIZER"], "init_args": args}
(root / "config.yaml").write_text(yaml.safe_dump(cfg))
PYEOF
  local start=$SECONDS
  esft fit --config "$WORK/$name/config.yaml" "$@" --model.model "${MODEL_DIR:-$WORK/model}" --model.dtype auto \
    --trainer.accelerator "$ACCEL" --trainer.max_steps "$STEPS" --trainer.val_check_interval "$STEPS" \
    --trainer.limit_val_batches 2 --trainer.enable_progress_bar false --trainer.log_every_n_steps 1 \
    --data.seq_length "$SEQ" --data.batch_size 2 >"$WORK/$name.log" 2>&1 || { tail -60 "$WORK/$name.log"; exit 1; }
  echo "$name $((SECONDS - start))" >>"$WORK/times"
}
fit fsdp --config configs/fsdp.yaml --trainer.devices 1
fit single --trainer.devices 1
BLOCK=$([ "$TINY" = 1 ] && echo 32 || echo 128)
python -c "import sys; from esft_lightning.weights.quantized_export import write_fp8_checkpoint as w; \
print(w(sys.argv[1], sys.argv[2], ($BLOCK, $BLOCK)), 'tensors written in block FP8')" "$WORK/model" "$WORK/model-fp8"
MODEL_DIR="$WORK/model-fp8" fit fp8 --trainer.devices 1
MODEL_DIR="$WORK/model-fp8" FROZEN=float8 fit fp8-8bit --trainer.devices 1
OPTIMIZER=esft_lightning.optimizers.HostOffloadAdamW fit host-adamw --trainer.devices 1

python - "$WORK" <<'EOF'
import csv, math, re, sys
from pathlib import Path
work = Path(sys.argv[1])
times = dict(line.split() for line in (work / "times").read_text().splitlines())
print("\n| run | seconds | trainable dtype | first / last train loss | val loss | tokens/s (last) | memory (params, grads, AdamW on the device, peak GPU) |")
print("| --- | --- | --- | --- | --- | --- | --- |")
for name in ("fsdp", "single", "fp8", "fp8-8bit", "host-adamw"):
    log = (work / f"{name}.log").read_text()
    metrics = sorted((work / name).rglob("metrics.csv"))[-1]
    rows = list(csv.DictReader(metrics.open()))
    loss = [float(r["train/loss"]) for r in rows if r.get("train/loss")]
    tps = [float(r["train/tokens_per_sec"]) for r in rows if r.get("train/tokens_per_sec")]
    val = [float(v) for r in rows for k, v in r.items() if k.startswith("val/") and k.endswith("/loss") and v]
    mem = re.search(r"ESFT memory rank 0: (.*)", log)
    ckpt = sorted((work / name).rglob("last*.ckpt"))
    import torch
    dtype = torch.load(ckpt[-1], map_location="cpu", weights_only=False)["esft"]["trainable_dtype"] if ckpt else "?"
    assert all(math.isfinite(x) for x in loss), f"{name}: non-finite loss"
    print(f"| {name} | {times[name]} | {dtype} | {loss[0]:.3f} / {loss[-1]:.3f} | {val[-1] if val else float('nan'):.3f} "
          f"| {tps[-1] if tps else 0:.0f} | {mem.group(1) if mem else '?'} |")
EOF

echo
if [ "$TINY" = 1 ]; then echo "(GPU_CHECK_TINY: benchmarks/gpu.py skipped)"; else python benchmarks/gpu.py --layers 4 --batch 4 --seq 2048; fi
