"""The Python API (qkdstack.simulate, distill, keyrate): documented rows, agreement with the CLI on the same
seed, use inside a running event loop, and one-sentence ConfigErrors naming the parameter."""

from __future__ import annotations

import argparse
import asyncio
import inspect
import json
import subprocess
import sys
import threading
from pathlib import Path

import pytest

import qkdstack
from qkdstack import api
from qkdstack.cli import main
from qkdstack.errors import ConfigError

DOCS = Path(__file__).resolve().parent.parent / "docs" / "api.md"

# Small frames that still give key at 10 km (5e7 pulses: about 6e5 key-basis detections).
DISTILL_KM, DISTILL_PULSES = 10.0, 50_000_000


def _cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    try:
        rc = main(argv)
    except SystemExit as exc:  # argparse's own errors exit
        rc = int(exc.code or 0)
    out, err = capsys.readouterr()
    return rc, out, err


def _scalar(value: object) -> bool:
    return value is None or isinstance(value, bool | int | float | str)


# ----------------------------------------------------------------------------------------- the package


def test_import_qkdstack_loads_no_heavy_library() -> None:
    code = "import sys, qkdstack; print(sorted(m for m in ('numpy', 'scipy', 'numba', 'fastapi') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_facade_functions_are_the_api_module_s() -> None:
    assert qkdstack.simulate is api.simulate
    assert qkdstack.distill is api.distill
    assert qkdstack.keyrate is api.keyrate
    assert {"simulate", "distill", "keyrate", "ConfigError"} <= set(dir(qkdstack))
    with pytest.raises(AttributeError, match="no attribute 'simulat'"):
        qkdstack.simulat  # noqa: B018


@pytest.mark.parametrize("command, function", [("simulate", api.simulate), ("distill", api.distill),
                                               ("keyrate", api.keyrate)])
def test_parameters_and_defaults_are_the_cli_s(command: str, function) -> None:
    """One parameter, one name: each parameter is a flag of the command, with the command's default."""
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command")
    __import__(f"qkdstack.commands.{command}", fromlist=["register"]).register(sub)
    defaults = vars(parser.parse_args([command]))
    for name, param in inspect.signature(function).parameters.items():
        assert name in defaults, f"{command}: {name} is no flag of qkdstack {command}"
        want = defaults[name]
        if name == "distance_km":
            want = want[0]
        param_default = tuple(param.default) if isinstance(want, tuple) else param.default
        assert param_default == want, f"{command}: {name} defaults to {param.default!r}, the CLI to {want!r}"
    assert "p_z" not in inspect.signature(function).parameters  # the key-basis probability is set once


# --------------------------------------------------------------------------------------------- records


def test_simulate_rows_have_the_documented_fields() -> None:
    rows = qkdstack.simulate(distance_km=[10, 25], pulses=1e6, seed=3)
    assert len(rows) == 2 * 3 * 2  # distances × intensity classes × bases
    for row in rows:
        assert tuple(row) == api.SIMULATE_FIELDS
        assert all(_scalar(v) for v in row.values())
    assert [r["distance_km"] for r in rows[::6]] == [10.0, 25.0]
    signal_z = [r for r in rows if r["class"] == 0 and r["basis"] == "Z"]
    assert signal_z[0]["detections"] > signal_z[1]["detections"] > 0  # more loss at 25 km
    assert all(r["pulses"] == 1_000_000 and r["seed"] == 3 and r["eve"] == "none" for r in rows)


def test_distill_rows_have_the_documented_fields() -> None:
    rows = qkdstack.distill(distance_km=DISTILL_KM, pulses=DISTILL_PULSES, rounds=2, seed=4)
    assert [r["round"] for r in rows] == [1, 2]
    for row in rows:
        assert tuple(row) == api.DISTILL_FIELDS
        assert all(_scalar(v) for v in row.values())
        assert row["aborted"] is False and row["abort_stage"] is None
        assert row["key_bits"] > 0 and row["sifted_key_bits"] > row["key_bits"]
        assert row["secret_key_rate_bit_per_pulse"] == pytest.approx(row["key_bits"] / DISTILL_PULSES)
        assert row["leakage_bits_total"] > 0
    assert rows[0]["detections"] != rows[1]["detections"]  # two frames, not one twice


def test_distill_reports_an_abort_as_a_row() -> None:
    rows = qkdstack.distill(distance_km=25, pulses=1e7, seed=1)  # far too small a frame
    (row,) = rows
    assert tuple(row) == api.DISTILL_FIELDS
    assert row["aborted"] is True and row["abort_stage"] == "estimation" and "longer frames" in row["abort_reason"]
    assert row["key_bits"] == 0 and row["secret_key_rate_bit_per_s"] == 0.0 and row["detections"] is None


def test_keyrate_rows_have_the_documented_fields() -> None:
    rows = qkdstack.keyrate(distance_km="0:100:50", block_size=1e6)
    assert [r["distance_km"] for r in rows] == [0.0, 50.0, 100.0]
    for row in rows:
        assert tuple(row) == api.KEYRATE_FIELDS
        assert all(_scalar(v) or isinstance(v, tuple) for v in row.values())
        assert row["method"] == "lim2014" and row["block_size"] == 1e6
    assert rows[0]["rate_per_pulse"] > rows[1]["rate_per_pulse"] > rows[2]["rate_per_pulse"] > 0
    assert rows[0]["intensities"] == (0.5, 0.25, 0.0) and rows[0]["basis_prob_z"] == 0.8
    asymptotic = qkdstack.keyrate(distance_km=50, basis_prob_z=0.5)
    assert asymptotic[0]["method"] == "infinite" and asymptotic[0]["receiver_basis_prob_z"] == 0.5


def test_docs_describe_every_field_and_parameter() -> None:
    text = DOCS.read_text(encoding="utf-8")
    for name in (*api.SIMULATE_FIELDS, *api.DISTILL_FIELDS, *api.KEYRATE_FIELDS):
        assert f"`{name}`" in text, f"docs/api.md does not describe the field {name}"
    for function in (api.simulate, api.distill, api.keyrate):
        for name in inspect.signature(function).parameters:
            assert f"`{name}`" in text, f"docs/api.md does not describe the parameter {name}"


# ------------------------------------------------------------------------------------- agreement with CLI


def test_simulate_agrees_with_the_cli_on_the_same_seed(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = _cli(["simulate", "--distance-km", "30", "--pulses", "2e6", "--seed", "11", "--mu", "0.6",
                       "--basis-prob-z", "0.7", "--json"], capsys)
    assert rc == 0
    cli_rows = json.loads(out)["classes"]
    rows = qkdstack.simulate(distance_km=30, pulses=2e6, seed=11, mu=0.6, basis_prob_z=0.7)
    assert [{k: r[k] for k in cli_rows[0]} for r in rows] == cli_rows
    assert qkdstack.simulate(distance_km=30, pulses=2e6, seed=12, mu=0.6, basis_prob_z=0.7) != rows


def test_distill_agrees_with_the_cli_on_the_same_seed(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = _cli(["distill", "--distance-km", str(DISTILL_KM), "--pulses", str(DISTILL_PULSES), "--seed", "5",
                       "--json"], capsys)
    assert rc == 0
    (cli_round,) = json.loads(out)["rounds"]
    (row,) = qkdstack.distill(distance_km=DISTILL_KM, pulses=DISTILL_PULSES, seed=5)
    same_frame = ("detections", "sifted_key_bits", "sifted_test_bits", "qber_z", "qber_x", "phase_error_bound")
    assert {k: row[k] for k in same_frame} == {k: cli_round[k] for k in same_frame}
    # Cascade's shuffles come from the OS: its disclosed bits, and so the key, vary by about 2 % (12 runs: 1.6 %).
    assert row["key_bits"] == pytest.approx(cli_round["key_bits"], rel=0.1)


# ------------------------------------------------------------------------------------------ event loops


async def test_distill_inside_a_running_event_loop() -> None:
    """As in a Jupyter cell: the caller's thread runs an event loop, where asyncio.run would refuse."""
    asyncio.get_running_loop()
    (row,) = qkdstack.distill(distance_km=DISTILL_KM, pulses=DISTILL_PULSES, seed=6)
    assert row["aborted"] is False and row["key_bits"] > 0
    await asyncio.sleep(0)  # the caller's loop still runs


async def test_run_coroutine_uses_a_worker_loop_only_under_a_running_loop() -> None:
    async def where() -> tuple[str, int]:
        return threading.current_thread().name, id(asyncio.get_running_loop())

    name, loop_id = api.run_coroutine(where())
    assert name.startswith("qkdstack-api") and loop_id != id(asyncio.get_running_loop())

    async def fails() -> None:
        raise ConfigError("x: the worker's exception comes back")

    with pytest.raises(ConfigError, match="comes back"):
        api.run_coroutine(fails())


def test_run_coroutine_without_a_loop_runs_in_this_thread() -> None:
    async def where() -> str:
        return threading.current_thread().name

    assert api.run_coroutine(where()) == threading.current_thread().name


# --------------------------------------------------------------------------------------------- bad input

BAD = [
    # (function, keyword arguments, the parameter the sentence must name)
    ("simulate", {"mu": "abc"}, "mu"),
    ("simulate", {"mu": -1}, "mu"),
    ("simulate", {"detector_efficiency": 2}, "detector_efficiency"),
    ("simulate", {"distance_km": -3}, "distance_km"),
    ("simulate", {"distance_km": [10, float("nan")]}, "distance_km"),
    ("simulate", {"distance_km": "10:5:1"}, "distance_km"),
    ("simulate", {"distance_km": {"a": 1}}, "distance_km"),
    ("simulate", {"seed": -1}, "seed"),
    ("simulate", {"seed": 1.5}, "seed"),
    ("simulate", {"pulses": 0}, "pulses"),
    ("simulate", {"pulses": 1.5}, "pulses"),
    ("simulate", {"eve": "mallory"}, "eve"),
    ("simulate", {"afterpulse_mode": "later"}, "afterpulse_mode"),
    ("simulate", {"intensity_probs": [0.5, 0.5]}, "intensity_probs"),
    ("simulate", {"basis_prob_z": 1.5}, "basis_prob_z"),
    ("simulate", {"receiver_basis_prob_z": 0}, "receiver_basis_prob_z"),
    ("simulate", {"rep_rate": True}, "rep_rate"),
    ("distill", {"eps_sec": 2}, "eps_sec"),
    ("distill", {"eps_sec": 0}, "eps_sec"),
    ("distill", {"eps_cor": -1}, "eps_cor"),
    ("distill", {"max_qber": 5}, "max_qber"),
    ("distill", {"max_phase_error": 7}, "max_phase_error"),
    ("distill", {"rounds": 0}, "rounds"),
    ("distill", {"reconciliation": "magic"}, "reconciliation"),
    ("distill", {"cascade_schedule": "fast"}, "cascade_schedule"),
    ("distill", {"misalignment": 0.7}, "misalignment"),
    ("keyrate", {"block_size": 0}, "block_size"),
    ("keyrate", {"block_size": 1e6, "decoy_method": "infinite"}, "block_size"),
    ("keyrate", {"decoy_method": "many"}, "decoy_method"),
    ("keyrate", {"ec_efficiency": 0.5}, "ec_efficiency"),
    ("keyrate", {"optimize": "yes"}, "optimize"),
    ("keyrate", {"dark_count": -1e-6}, "dark_count"),
]


@pytest.mark.parametrize("function, kwargs, name", BAD, ids=[f"{f}-{'-'.join(k)}" for f, k, _ in BAD])
def test_bad_parameters_raise_one_sentence_naming_the_parameter(function: str, kwargs: dict, name: str) -> None:
    with pytest.raises(ConfigError) as caught:
        getattr(qkdstack, function)(**kwargs)
    message = str(caught.value)
    assert name in message, message
    assert "--" not in message and "\n" not in message, message


def test_distill_refuses_bad_settings_before_simulating(monkeypatch: pytest.MonkeyPatch) -> None:
    """A bad setting at the last distance is refused before the first distance's frame is simulated."""
    from qkdstack.commands import distill as command

    monkeypatch.setattr(command, "SimulatedDevice", None)  # any frame simulated would fail with a TypeError
    with pytest.raises(ConfigError, match="distance_km"):
        qkdstack.distill(distance_km=[10, -1], pulses=DISTILL_PULSES)
    with pytest.raises(ConfigError, match="eps_sec"):
        qkdstack.distill(distance_km=[10, 20], eps_sec=1.0)


@pytest.mark.parametrize("argv, flag", [
    (["distill", "--eps-sec", "2"], "--eps-sec"),
    (["distill", "--eps-cor", "-1"], "--eps-cor"),
    (["distill", "--max-qber", "5"], "--max-qber"),
    (["distill", "--max-phase-error", "-1"], "--max-phase-error"),
    (["simulate", "--seed", "-1", "--pulses", "1e6"], "--seed"),
])
def test_cli_refuses_the_same_values_in_one_line(argv: list[str], flag: str, capsys: pytest.CaptureFixture[str],
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """The CLI shares these checks: exit 2, one line naming the flag, before any frame is simulated."""
    from qkdstack.commands import distill, simulate

    monkeypatch.setattr(distill, "SimulatedDevice", None)
    monkeypatch.setattr(simulate, "SimulatedDevice", None)
    rc, out, err = _cli(argv, capsys)
    assert rc == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and flag in err and "Traceback" not in err
