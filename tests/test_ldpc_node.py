"""LDPC reconciliation through the command line and through two nodes over TCP."""

from __future__ import annotations

import json

import pytest

from _node_support import deploy, edit_config, run_nodes, status
from qkdstack.cli import main
from qkdstack.errors import ConfigError
from qkdstack.node.config import load_config

GOOD = ["--distance-km", "25", "--mu", "0.5", "--decoys", "0.25,0", "--intensity-probs", "0.4,0.4,0.2",
        "--basis-prob-z", "0.8", "--pulses", "6e7", "--seed", "3"]


def test_distill_ldpc_json_names_f_and_frame_outcomes(capsys):
    # Uses the default code length (built once into the user's cache, ~20 s the first time).
    assert main(["distill", *GOOD, "--reconciliation", "ldpc", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    r = out["rounds"][0]
    assert out["summary"]["accepted"] == 1 and r["key_bits"] > 0
    assert r["reconciliation"] == "ldpc" and 1.0 < r["reconciliation_efficiency"] < 2.0
    frames = r["ldpc_frames"]
    assert frames["codewords"] >= 1 and 0 <= frames["failed_first_decoding"] <= frames["codewords"]
    assert r["reconciliation_round_trips"] == frames["blind_rounds"] + 1
    assert set(r["leakage_bits"]) == {"ldpc", "verification"}
    assert out["summary"]["ldpc"]["frames_given_up"] == 0
    assert "ldpc" in r["stage_seconds"] and "cascade" not in r["stage_seconds"]


def test_distill_rejects_unknown_reconciliation(capsys):
    with pytest.raises(SystemExit) as info:
        main(["distill", *GOOD, "--reconciliation", "turbo"])
    assert info.value.code == 2


def test_config_reconciliation_field(tmp_path):
    layouts = deploy(tmp_path / "dep", "psk", rounds=1)
    cfg = layouts["A"].config
    assert load_config(cfg).protocol.reconciliation == "cascade"  # the default
    edit_config(cfg, protocol={"reconciliation": "ldpc"})
    assert load_config(cfg).protocol.reconciliation == "ldpc"
    edit_config(cfg, protocol={"reconciliation": "turbo"})
    with pytest.raises(ConfigError, match=r"\[protocol\] reconciliation"):
        load_config(cfg)


async def test_two_nodes_over_tcp_with_ldpc(tmp_path):
    out = tmp_path / "dep"
    layouts = deploy(out, "psk", rounds=2)
    for layout in layouts.values():
        edit_config(layout.config, protocol={"reconciliation": "ldpc"})
    await run_nodes([layouts["A"].config, layouts["B"].config], timeout=120)
    for site in ("A", "B"):
        st = status(out / site)
        assert st["rounds_accepted"] == 2 and st["rounds_aborted"] == 0, st
        assert "ldpc" in json.dumps(st["last_round"]), st["last_round"]
