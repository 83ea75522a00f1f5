"""The miniature replication's --quick mode: the table's structure and files (never its outcome)."""

import json
import subprocess
import sys

import pytest

from .conftest import REPO

pytestmark = pytest.mark.slow  # a subprocess of about 30 s


def test_quick_replication_writes_the_table_plots_and_results(tmp_path):
    cmd = [sys.executable, str(REPO / "benchmarks/replicate_paper.py"), "--quick", "--out", str(tmp_path)]
    done = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    for name in ("table.md", "results.json", "concentration.png", "overlap.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    lines = (tmp_path / "table.md").read_text().splitlines()
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert header[:3] == ["method", "intent EM / chrF", "cipher EM / chrF"] and len(header) == 9
    methods = [line.split("|")[1].strip() for line in lines[2:]]
    assert [m.split(" ")[0] for m in methods] == [
        "pretrained",
        "full",
        "ESFT-Token",
        "ESFT-Gate",
        "LoRA",
        "random",
        "frozen",
        "one",
    ]
    report = json.loads((tmp_path / "results.json").read_text())
    assert {r["method"] for r in report["runs"]} == {
        "base",
        "fft",
        "esft_token",
        "esft_gate",
        "lora",
        "random",
        "frozen",
        "merged",
    }
    assert set(report["figures"]["top6_share"]) >= {"intent", "cipher", "arithmetic"}
