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


def _git_status() -> str | None:
    import subprocess

    try:
        done = subprocess.run(["git", "status", "--porcelain"], cwd=REPO, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout if done.returncode == 0 else None


@pytest.fixture(scope="session", autouse=True)
def _checkout_stays_clean():
    """The suite writes only under tmp_path: the checkout's git status is the same after it as before."""
    outputs = ("runs", "lightning_logs", "adapter")  # run outputs that .gitignore would hide
    before, existed = _git_status(), {name for name in outputs if (REPO / name).exists()}
    yield
    after, created = _git_status(), {name for name in outputs if (REPO / name).exists()} - existed
    if (before is not None and after != before) or created:
        pytest.fail(f"the test suite wrote into the checkout: {sorted(created)}\n{after}")


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
