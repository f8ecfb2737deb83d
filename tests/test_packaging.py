"""Packaging: strategies/ and backbones/ ship as resprune.strategies and resprune.backbones.

Both an editable install (the test environment) and a freshly built wheel must import
them, must not claim the generic top-level names, and must carry the configs and photos.
"""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

PROBE = """
import importlib.util, json, resprune, resprune.strategies, resprune.backbones
from resprune.config import shipped_configs
print(json.dumps({
    "resprune": resprune.__file__,
    "strategies": resprune.strategies.__file__,
    "backbones": resprune.backbones.__file__,
    "top_level_strategies": importlib.util.find_spec("strategies") is not None,
    "top_level_backbones": importlib.util.find_spec("backbones") is not None,
    "configs": len(shipped_configs()),
    "selectors": sorted(resprune.get_host().selectors.names()),
}))
"""


def probe(cwd: Path, env: dict[str, str] | None = None) -> dict:
    out = subprocess.run([sys.executable, "-c", PROBE], cwd=cwd, env=env, capture_output=True, text=True,
                         check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_editable_install_imports_subpackages_from_any_directory(tmp_path):
    info = probe(tmp_path)
    assert Path(info["strategies"]).parent == ROOT / "strategies"
    assert Path(info["backbones"]).parent == ROOT / "backbones"
    assert not info["top_level_strategies"] and not info["top_level_backbones"]
    assert info["configs"] >= 20 and "residual_energy" in info["selectors"]


@pytest.mark.slow
def test_built_wheel_installs_and_imports_subpackages(tmp_path):
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation",
                    "-q", "-w", str(wheels)], check=True, capture_output=True, text=True)
    (wheel,) = wheels.glob("resprune-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "resprune/strategies/residual_energy.py" in names
    for init in (ROOT / "resprune").rglob("__init__.py"):  # every subpackage (a new one must be listed in pyproject)
        assert init.relative_to(ROOT).as_posix() in names, init
    assert "resprune/backbones/__init__.py" in names
    assert "resprune/configs/resprune-llava15.yaml" in names
    for task_file in ("resprune_samples.yaml", "utils.py"):  # the lmms-eval task ships with its code
        assert f"resprune/lmms/tasks/resprune_samples/{task_file}" in names
    entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    assert "[lmms_eval.models]\nresprune = resprune.lmms:manifests" in zipfile.ZipFile(wheel).read(entry_points).decode()
    assert any(n.startswith("resprune/data/photos/") and n.endswith(".jpg") for n in names)
    assert not any(n.startswith(("strategies/", "backbones/", "tests/")) for n in names)

    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
                   check=True, capture_output=True, text=True)
    env = {"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin", "RESPRUNE_DISABLE_PLUGIN_AUTOLOAD": "1"}
    # PYTHONPATH comes before site-packages, and setuptools' editable finder runs after the
    # path finder, so the wheel's copy is the one imported (asserted below)
    out = subprocess.run([sys.executable, "-s", "-c", PROBE], cwd=tmp_path, env=env, capture_output=True,
                         text=True, check=True)
    info = json.loads(out.stdout.strip().splitlines()[-1])
    assert Path(info["resprune"]).is_relative_to(target)
    assert Path(info["strategies"]).is_relative_to(target / "resprune" / "strategies")
    assert Path(info["backbones"]).is_relative_to(target / "resprune" / "backbones")
    assert not info["top_level_strategies"] and not info["top_level_backbones"]
    assert info["configs"] >= 20 and "dpp" in info["selectors"]
