"""The benchmark scripts start as the README documents (``python examples/benchmarks/X.py``).

Python puts a script's own folder first on ``sys.path``, so a script named like an installed
package (``kernels.py`` against the ``kernels`` package that transformers imports) hides it from
every other script in the folder.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "examples" / "benchmarks"


@pytest.mark.parametrize("script", sorted(p.stem for p in BENCH.glob("*.py")))
def test_no_benchmark_script_hides_an_installed_module(script: str) -> None:
    spec = importlib.util.find_spec(script) if script.isidentifier() else None
    assert spec is None or (spec.origin and Path(spec.origin).parent == BENCH), (
        f"examples/benchmarks/{script}.py hides the installed module {script!r} ({spec.origin}); rename it"
    )


def test_a_benchmark_script_starts_from_its_documented_command() -> None:
    r = subprocess.run(
        [sys.executable, str(BENCH / "structured_quality.py"), "--help"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert "usage:" in r.stdout


def _recovery_script(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(BENCH / "recovery_quality.py"), *args],
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_recovery_benchmark_lists_its_rows_and_refuses_bad_arguments_before_any_work() -> None:
    r = _recovery_script("--help")
    assert r.returncode == 0, r.stderr[-2000:]
    for row in ("minitron-kl+sqh", "flap-ce", "sparsegpt70", "sparsegpt24", "gptq3-g128", "gradual70"):
        assert row in r.stdout
    r = _recovery_script("--rows", "sparsegpt70,nonsense", "--model", "/nonexistent")
    assert r.returncode == 2 and "unknown row(s) nonsense" in r.stderr
    r = _recovery_script("--tokens", "100", "--seqlen", "64", "--batch-size", "2", "--model", "/nonexistent")
    assert r.returncode == 2 and "smaller than one step (128 tokens)" in r.stderr
