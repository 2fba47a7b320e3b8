"""`qkdstack keyrate`: table, JSON, plot, bisection of the maximum distance, rejected parameters."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from qkdstack.cli import main

GYS_FLAGS = [
    "--detector-efficiency", "0.045",
    "--dark-count", "1.7e-6",
    "--misalignment", "0.033",
    "--attenuation", "0.21",
    "--ec-efficiency", "1.22",
    "--basis-prob-z", "0.5",
]  # fmt: skip


def run_json(capsys: pytest.CaptureFixture[str], *argv: str) -> dict:
    assert main(["keyrate", *argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_json_gys_infinite_decoy(capsys: pytest.CaptureFixture[str]) -> None:
    out = run_json(capsys, *GYS_FLAGS, "--distance-km", "0:100:50", "--optimize", "--decoy-method", "infinite")
    assert out["method"] == "infinite"
    assert [p["distance_km"] for p in out["points"]] == [0.0, 50.0, 100.0]
    rates = [p["rate_per_pulse"] for p in out["points"]]
    assert rates[0] > rates[1] > rates[2] > 0
    for p in out["points"]:
        assert p["rate_bps"] == pytest.approx(p["rate_per_pulse"] * 1e9)
        assert p["detail"]["q"] == 0.5  # symmetric BB84: sifting factor 1/2 included
        assert p["intensities"][0] == pytest.approx(0.48, abs=0.015)
    assert out["points"][0]["plob_per_pulse"] is None  # −log2(0) = inf at 0 km
    assert out["points"][2]["plob_per_pulse"] > rates[2]
    # Bisection, not the grid: the Ma 2005 GYS maximum distance is about 142 km.
    assert out["max_distance_km"] == pytest.approx(142.0, abs=1.0)


def test_json_lim2014_finite_block(capsys: pytest.CaptureFixture[str]) -> None:
    common = ["--distance-km", "50", "--afterpulse", "0.04", "--misalignment", "0.005"]
    common += ["--mu", "0.45", "--decoys", "0.2,0.0002", "--intensity-probs", "0.5,0.3,0.2", "--basis-prob-z", "0.7"]
    small = run_json(capsys, *common, "--block-size", "1e7")
    large = run_json(capsys, *common, "--block-size", "1e9")
    asym = run_json(capsys, *common, "--decoy-method", "lim2014")
    r7, r9, ra = (o["points"][0]["rate_per_pulse"] for o in (small, large, asym))
    assert 0 < r7 < r9 < ra
    pt = large["points"][0]
    assert pt["secret_bits_per_block"] > 0 and pt["block_size"] == 1e9
    assert pt["detail"]["leakage_bits"] > 0 and pt["detail"]["eps_sec"] == 1e-10
    assert small["max_distance_km"] < large["max_distance_km"]


def test_table_output(capsys: pytest.CaptureFixture[str]) -> None:
    assert (
        main(["keyrate", *GYS_FLAGS, "--distance-km", "10,20", "--decoy-method", "vacuum-weak", "--decoys", "0.05,0"])
        == 0
    )
    out = capsys.readouterr().out
    assert "rate_bit/s" in out and "PLOB" in out
    assert "max_distance_km:" in out
    assert len([ln for ln in out.splitlines() if ln.strip().startswith(("10.00", "20.00"))]) == 2


def test_plot_written(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    png = tmp_path / "rate.png"
    assert main(["keyrate", *GYS_FLAGS, "--distance-km", "0:150:10", "--plot", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert png.stat().st_size > 5000


@pytest.mark.parametrize(
    "argv",
    [
        ["--distance-km", "-5"],
        ["--mu", "0.1", "--decoys", "0.2,0"],  # intensities out of order
        ["--intensity-probs", "0.5,0.2,0.2"],  # do not sum to 1
        ["--eps-sec", "2"],
        ["--eps-cor", "0"],
        ["--ec-efficiency", "0.9"],
        ["--block-size", "1e6", "--decoy-method", "infinite"],
        ["--block-size", "0"],
        ["--decoy-method", "lim2014", "--decoys", "0.3,0.25"],  # μ1 ≤ μ2 + μ3
        ["--decoy-method", "vacuum-weak", "--decoys", "0.1"],  # no vacuum decoy
        ["--decoy-method", "bogus"],
        ["--basis-prob-z", "1.2"],
    ],
)
def test_bad_parameters_exit_2_with_one_sentence(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc_info:
        code = main(["keyrate", *argv])
        raise SystemExit(code)
    assert exc_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "error" in err and "Traceback" not in err


def test_optimised_mu_below_listed_decoy_is_reported(capsys: pytest.CaptureFixture[str]) -> None:
    """With e_d = 8 % the infinite-decoy optimum μ ≈ 0.13 lies below the (ignored) decoy 0.3."""
    out = run_json(capsys, "--misalignment", "0.08", "--decoys", "0.3,0", "--optimize", "--distance-km", "0")
    pt = out["points"][0]
    assert pt["intensities"] == [pytest.approx(pt["detail"]["mu"])]
    assert 0.05 < pt["detail"]["mu"] < 0.3 and pt["rate_per_pulse"] > 0


def test_lossless_fibre_has_unbounded_distance(capsys: pytest.CaptureFixture[str]) -> None:
    out = run_json(capsys, "--attenuation", "0", "--distance-km", "10")
    assert out["max_distance_km"] is None and out["max_distance_unbounded"] is True
