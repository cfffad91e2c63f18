"""The import layers declared in pyproject.toml ([tool.importlinter]) hold: the CLI is a shell nothing imports,
core packages never import fine-tuning, recipes, diagnostics or the CLI, and variants are independent."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_import_contracts_are_kept():
    exe = shutil.which("lint-imports") or str(Path(sys.executable).parent / "lint-imports")
    res = subprocess.run([exe], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-1000:]
    assert "Contracts: 3 kept, 0 broken." in res.stdout
