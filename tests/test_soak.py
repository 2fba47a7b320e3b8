"""The short soak of issue 12: ten SIGKILL cycles of either node while an SAE pair takes keys.

The same probe as the long soak (``scripts/fault_probe.py --cycles 100 --faults kill``, outside CI), run for
ten cycles on a fresh deployment of two ``qkdstack node`` processes (small frames, ``[link] timeout_s`` 3 s):
each cycle kills A or B with SIGKILL at a random instant, restarts it, and waits until the survivor (the same
process) accepted a fresh round and an SAE key flows again. Throughout, master SAEs at A and at B take keys
over ETSI 014 and their slave SAEs fetch them by ID at the other site. After each cycle the last keys
delivered are asked for again (each must be refused) and the stores must agree; once more after a SIGTERM of
both nodes. :func:`run_probe` stops every process it started, also when it raises.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

PROBE = Path(__file__).resolve().parent.parent / "scripts" / "fault_probe.py"
CYCLES = 10


def _probe_module():
    spec = importlib.util.spec_from_file_location("fault_probe", PROBE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("fault_probe", module)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
@pytest.mark.timeout(300)
async def test_ten_sigkill_cycles_deliver_every_key_once_and_keep_the_stores_equal(tmp_path):
    probe = _probe_module()
    result = await probe.run_probe(tmp_path, cycles=CYCLES, faults="kill", timeout_s=3.0, seed=12, pause_s=0.7)
    print(json.dumps(result))
    failures = result["failures"]
    assert result["cycles"] == CYCLES and result["kills"] == CYCLES, failures
    assert result["survived"] == CYCLES and result["failed_cycles"] == 0, failures
    assert result["double_deliveries"] == 0, failures
    assert result["mismatches"] == 0, failures
    assert result["store_divergence"] == 0, failures
    assert result["keys_delivered"] > 0
    assert result["redeliveries_checked"] > 0  # the double-delivery check did ask again
    # Every cycle waited for a fresh round; a kill costs at most the round in flight, a round on the stale
    # session and a round accepted at one end only.
    assert result["rounds_accepted"] >= CYCLES
    assert result["rounds_lost"] <= 3 * CYCLES, result
    assert result["exit_codes_at_sigterm"] == {"A": 0, "B": 0}
    assert result["tracebacks_in_logs"] == 0
    assert probe.ok(result)
