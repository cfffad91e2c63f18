"""The import layers declared in pyproject.toml ([tool.importlinter]) hold: cli > train | diagnostics > api | recipe >
calibration > surgery > variants > data > sources > core, the base modules import no package, variants are
independent of each other, and no package has import cycles among its modules."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_import_contracts_are_kept():
    exe = shutil.which("lint-imports") or str(Path(sys.executable).parent / "lint-imports")
    res = subprocess.run([exe], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-1000:]
    assert "Contracts: 4 kept, 0 broken." in res.stdout


def test_copied_variant_folder_passes_the_contract_suite(tmp_path):
    """docs/contributing.md's recipe: copy a variant folder, rename what it registers, install it as a plugin
    (an entry point in the ``normswap.variants`` group), and the unchanged contract suite runs over it."""
    src = ROOT / "normswap" / "variants" / "bn_decomposed"
    dst = tmp_path / "mynorm"
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__"))
    for f in dst.glob("*.py"):
        text = f.read_text().replace("normswap.variants.bn_decomposed", "mynorm")
        text = text.replace('name = "recenter"', 'name = "my_recenter"').replace('name = "rescale"', 'name = "my_rescale"')
        f.write_text(text)
    info = tmp_path / "mynorm-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: mynorm\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[normswap.variants]\nmynorm = mynorm\n")
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}:{ROOT}", "HF_HUB_OFFLINE": "1"}
    res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", "my_recenter or my_rescale",
                          str(ROOT / "tests" / "test_variant_contract.py")],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-2000:]
    passed = int(res.stdout.strip().splitlines()[-1].split(" passed")[0].split()[-1])
    assert passed >= 8, res.stdout[-500:]  # 4 examples x 2 variants, at least
