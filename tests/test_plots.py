"""``--plot`` of keyrate, simulate and distill: a picture is written, and the numbers behind it are right.

Each command's figure is drawn from plain numbers (``qkdstack.plots.*_data``); the tests run the
command through ``qkdstack.cli.main`` with ``--json --plot``, check that the file is a picture of
some size that opens, and rebuild the data from the printed JSON with the same function the command
used, to check the numbers (a PNS attack must change the plotted gain ratio, not only the look).
"""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import pytest

from qkdstack import plots
from qkdstack.cli import build_parser, main
from qkdstack.commands import keyrate

pytest.importorskip("matplotlib")


def _opens(path: Path) -> tuple[int, ...]:
    """The picture's pixel array shape (matplotlib reads PNG itself); fails if it is not a PNG of some size."""
    from matplotlib.image import imread

    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert path.stat().st_size > 5000
    shape = imread(str(path)).shape
    assert shape[0] > 200 and shape[1] > 300
    return shape


# ------------------------------------------------------------------------------------------ keyrate

SWEEP = ["--distance-km", "0:200:20"]


def test_keyrate_several_curves_title_and_plob_grid(tmp_path: Path) -> None:
    png = tmp_path / "rate.png"
    argv = ["keyrate", *SWEEP, "--decoy-method", "infinite,lim2014", "--block-size", "1e6,1e8", "--plot", str(png)]
    args = build_parser(only="keyrate").parse_args(argv)
    results = keyrate.compute(args)
    data = keyrate.plot(args, results)
    _opens(png)
    assert [c["label"] for c in data["curves"]] == ["infinite, asymptotic", "lim2014, n_X = 1e+06",
                                                     "lim2014, n_X = 1e+08"]
    assert "infinite, lim2014" in data["title"] and "1e+06, 1e+08" in data["title"]
    assert "fixed intensities" in data["title"] and data["note"] is None
    # a smaller block gives less key, and the asymptotic rate bounds both
    r_inf, r_6, r_8 = (c["rate_per_pulse"][5] for c in data["curves"])  # 100 km
    assert 0 < r_6 < r_8 < r_inf
    assert [c["max_distance_km"] for c in data["curves"]] == [r["max_distance_km"] for r in results]
    # PLOB on a fine grid over the whole range, not only at the 11 distances: −log2(1 − 10^(−0.02 L))
    grid, bound = data["plob"]["distance_km"], data["plob"]["bound_per_pulse"]
    assert len(grid) == keyrate.PLOB_GRID_POINTS and grid[0] == 0 and grid[-1] == 200
    for x, b in zip(grid[1:], bound[1:], strict=True):
        assert b == pytest.approx(-math.log2(1 - 10 ** (-0.02 * x)), rel=1e-9)
    assert all(a > b for a, b in itertools.pairwise(bound))


def test_keyrate_single_value_form_and_optimised_title(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    png = tmp_path / "rate.svg"
    argv = ["keyrate", "--distance-km", "50", "--block-size", "1e7", "--optimize", "--plot", str(png), "--json"]
    assert main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["method"] == "lim2014" and out["settings"]["block_size"] == 1e7  # one curve: the same JSON as before
    assert png.read_text().lstrip().startswith("<?xml")
    args = build_parser(only="keyrate").parse_args(argv)
    data = keyrate.plot_data(args, keyrate.compute(args))
    assert "optimised" in data["title"] and "1e+07" in data["title"]
    grid = data["plob"]["distance_km"]
    assert grid[0] == 0 and grid[-1] == 100  # one distance: the bound from 0 to twice it


def test_keyrate_no_key_is_noted_in_figure_and_on_stdout(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    png = tmp_path / "nokey.png"
    assert main(["keyrate", *SWEEP, "--block-size", "1e3", "--plot", str(png)]) == 0
    assert "note: no key at any distance listed" in capsys.readouterr().out
    _opens(png)
    args = build_parser(only="keyrate").parse_args(["keyrate", *SWEEP, "--block-size", "1e3"])
    data = plots.keyrate_data(keyrate.compute(args), [0.0, 100.0], [1.0, 0.01], False)
    assert data["curves"][0]["no_key"] and "no key at any distance" in data["note"]


def test_keyrate_block_size_list_needs_lim2014() -> None:
    args = build_parser(only="keyrate").parse_args(["keyrate", "--block-size", "1e6,1e8", "--decoy-method",
                                                     "infinite"])
    with pytest.raises(Exception, match="needs --decoy-method lim2014"):
        keyrate.curves(args)


# ----------------------------------------------------------------------------------------- simulate


def _simulate(tmp_path: Path, capsys: pytest.CaptureFixture[str], eve: str) -> dict:
    png = tmp_path / f"sim-{eve}.png"
    argv = ["simulate", "--pulses", "2e6", "--seed", "3", "--eve", eve, "--json", "--plot", str(png)]
    assert main(argv) == 0
    result = json.loads(capsys.readouterr().out)
    _opens(png)
    return plots.simulate_data(result)


def _ratio(data: dict, cls: int, basis: str) -> float:
    return next(r["gain_ratio"] for r in data["classes"] if r["class"] == cls and r["basis"] == basis)


def test_simulate_plot_shows_pns(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    honest = _simulate(tmp_path, capsys, "none")
    pns = _simulate(tmp_path, capsys, "pns")
    assert "eve none" in honest["title"] and "eve pns" in pns["title"]
    # without Eve, measured = expected within the statistics (≈ 4000 detections: ±1.6 %)
    assert _ratio(honest, 0, "Z") == pytest.approx(1, abs=0.05)
    assert _ratio(honest, 1, "Z") == pytest.approx(1, abs=0.05)
    # PNS keeps the signal's gain and starves the weak decoy: the plotted ratio drops
    assert _ratio(pns, 0, "Z") == pytest.approx(1, abs=0.05)
    assert _ratio(pns, 1, "Z") < 0.85
    # the vacuum decoy's handful of dark counts draws no ratio bar
    assert _ratio(honest, 2, "Z") is None
    assert (tmp_path / "sim-none.png").read_bytes() != (tmp_path / "sim-pns.png").read_bytes()


# ------------------------------------------------------------------------------------------ distill


def test_distill_plot_qber_and_key_per_round(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    png = tmp_path / "rounds.png"
    argv = ["distill", "--distance-km", "10", "--rounds", "2", "--seed", "1", "--json",
            "--plot", str(png)]
    assert main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    _opens(png)
    data = plots.distill_data(out["rounds"], out["summary"], distance_km=10, max_qber=0.11)
    assert [r["round"] for r in data["rounds"]] == [1, 2]
    assert sum(r["key_bits"] for r in data["rounds"]) == out["summary"]["secret_bits"] > 0
    assert all(0 < r["qber_z"] < 0.03 and 0 < r["qber_x"] < 0.05 for r in data["rounds"])
    assert "2/2 rounds accepted" in data["title"] and data["note"] is None


def test_distill_plot_marks_aborted_rounds(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    png = tmp_path / "abort.png"
    argv = ["distill", "--distance-km", "10", "--pulses", "2e7", "--seed", "1", "--eve", "intercept-resend:0.6",
            "--json", "--plot", str(png)]
    assert main(argv) == 1  # no key: exit 1, and the figure is still written
    out = json.loads(capsys.readouterr().out)
    _opens(png)
    data = plots.distill_data(out["rounds"], out["summary"], distance_km=10, max_qber=0.11)
    (r,) = data["rounds"]
    assert r["aborted"] and r["key_bits"] == 0 and r["qber_z"] is None and "QBER" in r["reason"]
    assert data["note"].startswith("no key: every round aborted (estimation ×1)")


@pytest.mark.parametrize("command", [["keyrate", "--optimize", "--distance-km", "0:200:5"],
                                     ["simulate", "--pulses", "1e9"], ["distill", "--rounds", "50"]])
def test_bad_plot_file_refused_before_any_work(command: list[str], tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    import time

    start = time.perf_counter()
    with pytest.raises(SystemExit) as refused:  # argparse's exit, with qkdstack's one line
        main([*command, "--plot", str(tmp_path / "x.jpg2")])
    assert refused.value.code == 2
    assert time.perf_counter() - start < 5  # refused while parsing, not after a frame of 10^9 pulses
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and "--plot must end in a picture format" in err
