"""The wheel ships every module and resource file of the package (no hand-kept package list to forget)."""

import shutil
import subprocess
import sys
import zipfile

import pytest

from .conftest import REPO


@pytest.mark.slow
def test_wheel_holds_every_module_and_resource(tmp_path):
    source = tmp_path / "src"
    source.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(REPO / name, source / name)
    shutil.copytree(REPO / "esft_lightning", source / "esft_lightning", ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), "."],
        cwd=source,
        check=True,
        capture_output=True,
    )
    (wheel,) = tmp_path.glob("esft_lightning-*.whl")
    shipped = set(zipfile.ZipFile(wheel).namelist())
    wanted = {
        p.relative_to(source).as_posix()
        for p in (source / "esft_lightning").rglob("*")
        if p.is_file() and "__pycache__" not in p.parts
    }
    assert wanted, "no package files found"
    missing = sorted(wanted - shipped)
    assert not missing, f"the wheel misses {missing}"
    assert "esft_lightning/analysis/__init__.py" in shipped  # was left out by the hand-kept package list
