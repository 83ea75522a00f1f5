"""Shared fixtures: tiny models of every family, the shared ESFT data (skipped when ../shared is absent)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("ESFT_SHARED", REPO.parent / "shared"))
ESFT_DATA = SHARED / "data" / "esft"
FAMILIES = ["deepseek_v3", "deepseek_v2", "qwen3_moe", "qwen2_moe", "mixtral", "olmoe"]


@pytest.fixture(autouse=True)
def _isolate(tmp_path, monkeypatch):
    monkeypatch.setenv("ESFT_CACHE_DIR", str(tmp_path / "cache"))
    torch.manual_seed(0)


@pytest.fixture
def esft_data() -> Path:
    if not ESFT_DATA.exists():
        pytest.skip(f"shared ESFT data not found at {ESFT_DATA}")
    return ESFT_DATA


def write_jsonl(path: Path, records: list) -> Path:
    import json

    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def chat(user: str, reply: str) -> dict:
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]}
