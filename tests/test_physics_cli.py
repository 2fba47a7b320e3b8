"""``qkdstack simulate`` and the shared device flags."""

from __future__ import annotations

import argparse
import json
import math

import pytest

from qkdstack.cli import main
from qkdstack.commands.device_args import add_device_arguments, device_params_from_args, parse_distances
from qkdstack.errors import ConfigError
from qkdstack.theory.device import expected_detection_prob


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    try:
        code = main(list(argv))
    except SystemExit as exc:  # argparse errors
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def test_simulate_json(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_cli(
        capsys, "simulate", "--pulses", "2e7", "--distance-km", "30", "--dark-count", "1e-5", "--seed", "4", "--json"
    )
    assert code == 0
    result = json.loads(out)
    assert result["pulses"] == 20_000_000
    assert result["detections"] >= result["sifted"] > 0
    assert len(result["classes"]) == 6  # 3 intensities × 2 bases
    for row in result["classes"]:
        assert {"gain", "gain_theory", "qber", "qber_theory", "detections"} <= set(row)
        if row["class"] == 0 and row["basis"] == "Z":
            sigma = math.sqrt(row["pulses_expected"] * row["gain_theory"])
            assert abs(row["detections"] - row["pulses_expected"] * row["gain_theory"]) < 5 * sigma
    assert result["eve_knows_fraction_oracle"] == 0.0


def test_simulate_table_and_eve(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_cli(capsys, "simulate", "--pulses", "5000000", "--eve", "intercept-resend:1", "--seed", "1")
    assert code == 0
    assert "QBER" in out and "intercept-resend:1" in out
    code, out, _ = run_cli(capsys, "simulate", "--pulses", "1000000", "--split", "--seed", "1", "--json")
    assert code == 0 and json.loads(out)["form"] == "split"


@pytest.mark.parametrize(
    "argv",
    [
        ["--distance-km", "-1"],
        ["--mu", "0.05"],  # below the first decoy
        ["--intensity-probs", "0.5,0.2,0.2"],
        ["--intensity-probs", "0.5,0.5"],
        ["--basis-prob-z", "1.2"],
        ["--dark-count", "nan"],
        ["--eve", "beamsplit:2"],
        ["--eve", "martian"],
        ["--pulses", "0"],
        ["--pulses", "1.5"],
        ["--distance-km", "10,20"],
        ["--afterpulse", "1"],
    ],
)
def test_bad_parameters_exit_2(capsys: pytest.CaptureFixture[str], argv: list[str]) -> None:
    code, out, err = run_cli(capsys, "simulate", "--pulses", "1000", *argv)
    assert code == 2
    assert out == ""
    assert err.count("\n") == 1 and "error" in err


def test_device_args_round_trip() -> None:
    parser = argparse.ArgumentParser()
    add_device_arguments(parser)
    args = parser.parse_args(
        ["--distance-km", "0:100:25", "--mu", "0.4", "--decoys", "0.1", "--basis-prob-z", "0.5", "--rep-rate", "2.5e9"]
    )
    assert args.distance_km == (0.0, 25.0, 50.0, 75.0, 100.0)
    params = device_params_from_args(args, distance_km=50.0)
    assert params.source.intensities == (0.4, 0.1)
    assert params.source.intensity_probs == pytest.approx((0.6, 0.4))
    assert params.receiver.p_z == 0.5 and params.source.rep_rate_hz == 2.5e9
    assert expected_detection_prob(params, 0) > expected_detection_prob(params, 1)
    with pytest.raises(ConfigError, match="--distance-km"):
        device_params_from_args(args)  # several distances where one is needed
    assert parse_distances("5") == (5.0,)
    with pytest.raises(argparse.ArgumentTypeError):
        parse_distances("10:0:5")
