"""``qkdstack demo --topology``: the shipped ring of five, keys relayed, a relay node killed, keys rerouted."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

RING = Path(__file__).resolve().parents[1] / "examples" / "topologies" / "ring5.toml"


def test_the_network_demo_relays_and_reroutes_around_a_killed_node() -> None:
    done = subprocess.run([sys.executable, "-m", "qkdstack.cli", "demo", "--topology", str(RING)],
                          capture_output=True, text=True, timeout=600)
    out = done.stdout
    assert done.returncode == 0, out + done.stderr
    assert "links up                  5 of 5" in out
    assert "identical at both ends: True" in out
    assert "path 1                    A -> R1 -> B" in out
    assert "relay node R1 killed" in out and "rerouted after the kill   True" in out
    assert "Traceback" not in out + done.stderr
