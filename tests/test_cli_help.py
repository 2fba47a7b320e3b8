"""``qkdstack --help`` lists every sub-command without importing FastAPI, SciPy, Numba or NumPy (issue 14:
1.3 s of imports before the first line of help)."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from qkdstack.cli import COMMANDS, build_parser, command_summary

HEAVY = ("fastapi", "scipy", "numba", "numpy", "uvicorn", "matplotlib")


def _imported(importtime_stderr: str) -> set[str]:
    """Top-level package names of every module ``python -X importtime`` reports."""
    names = re.findall(r"^import time:\s+\d+ \|\s+\d+ \|\s*([\w.]+)\s*$", importtime_stderr, re.MULTILINE)
    assert names, "no -X importtime output"
    return {name.split(".")[0] for name in names}


def _summaries(parser) -> dict[str, str]:
    (sub,) = [a for a in parser._actions if a.dest == "command"]
    return {choice.dest: choice.help for choice in sub._choices_actions}


@pytest.mark.parametrize("argv", [["--help"], []])
def test_help_imports_no_heavy_library(argv: list[str]) -> None:
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "qkdstack.cli", *argv],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == (0 if argv else 2)
    assert sorted(_imported(proc.stderr) & set(HEAVY)) == []
    full = _summaries(build_parser())
    for name in COMMANDS:  # every sub-command listed, with its own help text
        assert re.search(rf"^\s+{name}\b", proc.stdout, re.MULTILINE), name
        first_words = " ".join(full[name].split()[:3])
        assert first_words in " ".join(proc.stdout.split()), name


def test_the_summaries_read_from_source_are_the_registered_ones() -> None:
    """The lazy listing reads each command's help= literal; it must equal what register() adds."""
    full = _summaries(build_parser())
    assert list(full) == COMMANDS
    for name in COMMANDS:
        assert command_summary(name) == full[name], name
    assert _summaries(build_parser(lazy=True)) == full
    assert command_summary("no-such-command") is None


def test_a_command_s_help_still_has_its_flags() -> None:
    proc = subprocess.run([sys.executable, "-m", "qkdstack.cli", "simulate", "--help"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "--distance-km" in proc.stdout and "--seed" in proc.stdout
