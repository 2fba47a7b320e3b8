"""First-run Numba compilation: said once on stderr, or done ahead by ``qkdstack warmup``.

Each test gives its processes a fresh ``NUMBA_CACHE_DIR`` (a fresh install's empty cache) and runs the
real command in a subprocess (Numba reads the cache location when it is imported).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from qkdstack.commands.warmup import (
    DISTILLATION_KERNELS,
    FRAME_KERNELS,
    LDPC_KERNELS,
    NODE_KERNELS,
    SIMULATION_KERNELS,
    cold_kernels,
)

NOTICE = "qkdstack: compiling the Numba kernels on this first run"


def _run(cache: Path, *argv: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "NUMBA_CACHE_DIR": str(cache)}
    return subprocess.run([sys.executable, "-m", "qkdstack.cli", *argv], env=env, capture_output=True, text=True,
                          timeout=timeout, check=False)


def _cached(cache: Path) -> set[str]:
    return {p.name for p in cache.rglob("*.nbc")}


def test_first_run_says_it_compiles_once(tmp_path: Path) -> None:
    first = _run(tmp_path, "simulate", "--pulses", "1e5", "--seed", "1")
    assert first.returncode == 0, first.stderr
    assert first.stderr.count(NOTICE) == 1 and "qkdstack warmup" in first.stderr
    second = _run(tmp_path, "simulate", "--pulses", "1e5", "--seed", "1")
    assert second.returncode == 0 and NOTICE not in second.stderr


def test_cold_kernels_reads_the_cache_without_numba(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NUMBA_CACHE_DIR", str(tmp_path))
    assert cold_kernels(NODE_KERNELS) == list(NODE_KERNELS)  # an empty cache: every kernel compiles
    code = "import sys; from qkdstack.commands.warmup import cold_kernels; cold_kernels(['x.y:z']); " \
           "print('numba' in sys.modules, 'numpy' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]  # cheap enough for demo's parent process


@pytest.mark.slow
def test_a_cascade_distill_compiles_every_distillation_kernel(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """distill, demo and node say they compile while one of DISTILLATION_KERNELS is cold, so a default (Cascade)
    round must compile all of them; the LDPC decoder's kernels, which it never runs, were once among them and
    made every later run claim to compile."""
    done = _run(tmp_path, "distill", "--distance-km", "10", "--pulses", "3e7", "--seed", "5")
    assert done.returncode == 0, done.stderr
    monkeypatch.setenv("NUMBA_CACHE_DIR", str(tmp_path))
    assert cold_kernels(FRAME_KERNELS + DISTILLATION_KERNELS) == []  # what distill checks: all warm now
    assert cold_kernels(LDPC_KERNELS) == list(LDPC_KERNELS)  # not run by a Cascade round, hence not listed there
    again = _run(tmp_path, "distill", "--distance-km", "10", "--pulses", "3e7", "--seed", "6")
    assert again.returncode == 0 and NOTICE not in again.stderr  # the record look-up once made it claim so


@pytest.mark.slow
def test_warmup_compiles_what_later_runs_need(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """After warmup, distill (Cascade and LDPC) and simulate compile nothing more and say nothing.

    The LDPC decoder's kernel is among them: it used to be called with a default array argument, a type
    Numba's cache never matched in a new process (recompiled, and one more cache file, every run).
    """
    warm = _run(tmp_path, "warmup", timeout=600)
    assert warm.returncode == 0, warm.stderr
    assert "done in" in warm.stdout
    after_warmup = _cached(tmp_path)
    assert any(n.startswith("ldpc_decoder.decode_lanes_warm") for n in after_warmup)
    assert any(n.startswith("cascade_kernels.") for n in after_warmup)
    monkeypatch.setenv("NUMBA_CACHE_DIR", str(tmp_path))
    assert cold_kernels(SIMULATION_KERNELS + NODE_KERNELS) == []  # what simulate, distill, demo and node check
    assert cold_kernels(LDPC_KERNELS) == []  # the LDPC decoder's lane kernel, both widths
    for argv in (["distill", "--distance-km", "10", "--pulses", "3e7", "--seed", "5"],
                 ["distill", "--distance-km", "10", "--pulses", "3e7", "--seed", "5", "--reconciliation", "ldpc"],
                 ["simulate", "--pulses", "1e5", "--split"]):
        done = _run(tmp_path, *argv)
        assert done.returncode == 0, done.stderr
        assert NOTICE not in done.stderr
    assert _cached(tmp_path) == after_warmup  # nothing compiled again, no new cache entry
    again = _run(tmp_path, "warmup")
    assert again.returncode == 0 and _cached(tmp_path) == after_warmup
