"""Every bad input a user would type: exit code 2, one line on stderr naming the flag, no traceback.

The table feeds each sub-command values that are wrong in the ways people get them wrong (negative,
zero, NaN, infinity, the wrong type, probabilities outside [0, 1], files that do not exist or are
folders, unwritable places) and runs ``qkdstack.cli.main`` in-process, so the whole table takes
seconds. Each case names what its one line must contain (the flag, or for a file the path's problem).
A bad value that is accepted would run the command: the computation-heavy cases carry a small frame
so that such a regression fails quickly rather than running for minutes, and a per-test timeout
stops one that would serve forever.

Also here: a mistyped flag names the command and suggests the closest flag (issue 14).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from qkdstack.cli import COMMANDS, main
from qkdstack.commands import warmup

# Placeholders filled per test: {dir} an empty folder, {full} a folder with a file in it, {file} a file
# (not TOML, not a certificate), {missing} a path that does not exist, {new} a path that may be created.
TUNNEL = ["tunnel", "--mode", "entry", "--listen", "127.0.0.1:0", "--connect", "127.0.0.1:9",
          "--kme-url", "https://127.0.0.1:1", "--cert", "{file}", "--key", "{file}", "--ca", "{file}",
          "--peer-sae", "SAE_B"]
KEY = ["key", "export", "--peer", "SAE_B", "--out", "{new}", "--etsi", "https://127.0.0.1:1",
       "--tls-cert", "{file}", "--tls-key", "{file}", "--ca", "{file}", "--format", "tls"]
SMALL = ["--pulses", "20000"]  # should a bad value be accepted, the frame is small

# (argv, what the one line must contain)
CASES: list[tuple[list[str], str]] = [
    # --- the list -------------------------------------------------------------------------
    (["simulate", "--seed", "-1", *SMALL], "--seed"),
    (["keyrate", "--plot", "x.jpg2"], "--plot"),
    (["node", "--config", "{dir}"], "folder"),
    (["init", "--out", "/proc/nope"], "--out"),
    (["distill", "--eps-sec", "2", *SMALL], "--eps-sec"),
    (["distill", "--eps-sec", "0", *SMALL], "--eps-sec"),
    (["distill", "--eps-cor", "-1", *SMALL], "--eps-cor"),
    (["distill", "--max-qber", "5", *SMALL], "--max-qber"),
    (["distill", "--max-qber", "-1", *SMALL], "--max-qber"),
    (["distill", "--max-phase-error", "7", *SMALL], "--max-phase-error"),
    (["init", "--out", "{new}", "--base-port", "70000"], "--base-port"),
    (["init", "--out", "{new}", "--distance-km", "-3"], "--distance-km"),
    (["init", "--out", "{new}", "--pulses-per-frame", "0"], "--pulses-per-frame"),
    (["init", "--out", "{new}", "--store", "mysql://x"], "--store"),
    (["init", "--out", "{new}", "--sites", "A B,C"], "--sites"),
    # --- the device model (simulate, keyrate, distill share these flags) -------------------------
    (["simulate", "--distance-km", "-3", *SMALL], "--distance-km"),
    (["simulate", "--distance-km", "nan", *SMALL], "--distance-km"),
    (["simulate", "--distance-km", "inf", *SMALL], "--distance-km"),
    (["simulate", "--distance-km", "ten", *SMALL], "--distance-km"),
    (["simulate", "--distance-km", "10,20", *SMALL], "--distance-km"),
    (["keyrate", "--distance-km", "50:10:5"], "--distance-km"),
    (["keyrate", "--distance-km", "0:10:0"], "--distance-km"),
    (["keyrate", "--distance-km", ""], "--distance-km"),
    (["keyrate", "--attenuation", "-0.2"], "--attenuation"),
    (["keyrate", "--attenuation", "nan"], "--attenuation"),
    (["keyrate", "--extra-loss", "-1"], "--extra-loss"),
    (["keyrate", "--detector-efficiency", "0"], "--detector-efficiency"),
    (["keyrate", "--detector-efficiency", "1.5"], "--detector-efficiency"),
    (["keyrate", "--dark-count", "-1e-6"], "--dark-count"),
    (["keyrate", "--dark-count", "2"], "--dark-count"),
    (["keyrate", "--misalignment", "-0.01"], "--misalignment"),
    (["keyrate", "--misalignment", "1.2"], "--misalignment"),
    (["keyrate", "--afterpulse", "1.5"], "--afterpulse"),
    (["keyrate", "--dead-time", "-1"], "--dead-time"),
    (["keyrate", "--mu", "0"], "--mu"),
    (["keyrate", "--mu", "-0.5"], "--mu"),
    (["keyrate", "--mu", "inf"], "--mu"),
    (["keyrate", "--decoys", "0.6,0"], "--mu/--decoys"),
    (["keyrate", "--decoys", "a,b"], "--decoys"),
    (["keyrate", "--intensity-probs", "0.5,0.5,0.5"], "--intensity-probs"),
    (["keyrate", "--intensity-probs", "0.5,0.5"], "--intensity-probs"),
    (["keyrate", "--intensity-probs", "1.2,-0.1,-0.1"], "--intensity-probs"),
    (["keyrate", "--basis-prob-z", "0"], "--basis-prob-z"),
    (["keyrate", "--basis-prob-z", "1.5"], "--basis-prob-z"),
    (["keyrate", "--receiver-basis-prob-z", "-1"], "--receiver-basis-prob-z"),
    (["keyrate", "--rep-rate", "0"], "--rep-rate"),
    (["keyrate", "--rep-rate", "-1e9"], "--rep-rate"),
    (["distill", "--detector-efficiency", "0", *SMALL], "--detector-efficiency"),
    (["distill", "--mu", "nan", *SMALL], "--mu"),
    # --- a simulated frame (simulate, distill) ----------------------------------------------------
    (["simulate", "--pulses", "0"], "--pulses"),
    (["simulate", "--pulses", "-5"], "--pulses"),
    (["simulate", "--pulses", "1.5"], "--pulses"),
    (["simulate", "--pulses", "many"], "--pulses"),
    (["simulate", "--pulses", "1e400"], "--pulses"),
    (["distill", "--pulses", "0"], "--pulses"),
    (["distill", "--pulses", "-1e6"], "--pulses"),
    (["simulate", "--eve", "bogus", *SMALL], "--eve"),
    (["simulate", "--eve", "intercept-resend:2", *SMALL], "--eve"),
    (["simulate", "--eve", "beamsplit:-0.1", *SMALL], "--eve"),
    (["simulate", "--eve", "intercept-resend:x", *SMALL], "--eve"),
    (["simulate", "--seed", "1.5", *SMALL], "--seed"),
    (["simulate", "--seed", "abc", *SMALL], "--seed"),
    (["distill", "--seed", "-1", *SMALL], "--seed"),
    # --- simulate's own ---------------------------------------------------------------------------
    (["simulate", "--frames", "0", *SMALL], "--frames"),
    (["simulate", "--frames", "-2", *SMALL], "--frames"),
    (["simulate", "--afterpulse-mode", "bogus", *SMALL], "--afterpulse-mode"),
    (["simulate", "--save", "{file}", *SMALL], "--save"),
    (["simulate", "--save", "/proc/nope", *SMALL], "--save"),
    # --- keyrate's own ----------------------------------------------------------------------------
    (["keyrate", "--plot", "{missing}/x.png"], "--plot"),
    (["keyrate", "--plot", "{dir}"], "--plot"),
    (["keyrate", "--ec-efficiency", "0.9"], "--ec-efficiency"),
    (["keyrate", "--ec-efficiency", "nan"], "--ec-efficiency"),
    (["keyrate", "--block-size", "0"], "--block-size"),
    (["keyrate", "--block-size", "-1e6"], "--block-size"),
    (["keyrate", "--block-size", "nan"], "--block-size"),
    (["keyrate", "--block-size", "1e6", "--decoy-method", "infinite"], "--block-size"),
    (["keyrate", "--eps-sec", "0"], "--eps-sec"),
    (["keyrate", "--eps-sec", "2"], "--eps-sec"),
    (["keyrate", "--eps-cor", "-1"], "--eps-cor"),
    (["keyrate", "--decoy-method", "bogus"], "--decoy-method"),
    # --- distill's own ----------------------------------------------------------------------------
    (["distill", "--rounds", "0", *SMALL], "--rounds"),
    (["distill", "--rounds", "-3", *SMALL], "--rounds"),
    (["distill", "--rounds", "two", *SMALL], "--rounds"),
    (["distill", "--eps-sec", "nan", *SMALL], "--eps-sec"),
    (["distill", "--eps-sec", "1", *SMALL], "--eps-sec"),
    (["distill", "--max-qber", "0", *SMALL], "--max-qber"),
    (["distill", "--max-qber", "nan", *SMALL], "--max-qber"),
    (["distill", "--max-phase-error", "-0.1", *SMALL], "--max-phase-error"),
    (["distill", "--cascade-schedule", "bogus", *SMALL], "--cascade-schedule"),
    (["distill", "--reconciliation", "bogus", *SMALL], "--reconciliation"),
    # --- init -------------------------------------------------------------------------------------
    (["init", "--out", "{full}"], "--out"),
    (["init", "--out", "{file}"], "--out"),
    (["init", "--out", "{new}", "--base-port", "0"], "--base-port"),
    (["init", "--out", "{new}", "--base-port", "-1"], "--base-port"),
    (["init", "--out", "{new}", "--base-port", "65530"], "--base-port"),
    (["init", "--out", "{new}", "--base-port", "http"], "--base-port"),
    (["init", "--out", "{new}", "--distance-km", "nan"], "--distance-km"),
    (["init", "--out", "{new}", "--distance-km", "inf"], "--distance-km"),
    (["init", "--out", "{new}", "--distance-km", "far"], "--distance-km"),
    (["init", "--out", "{new}", "--pulses-per-frame", "1500.5"], "--pulses-per-frame"),
    (["init", "--out", "{new}", "--pulses-per-frame", "-1e8"], "--pulses-per-frame"),
    (["init", "--out", "{new}", "--pulses-per-frame", "nan"], "--pulses-per-frame"),
    (["init", "--out", "{new}", "--pulses-per-frame", "100"], "--pulses-per-frame"),
    (["init", "--out", "{new}", "--store", "sqlite://relative.db"], "--store"),
    (["init", "--out", "{new}", "--store", ""], "--store"),
    (["init", "--out", "{new}", "--sites", "A"], "--sites"),
    (["init", "--out", "{new}", "--sites", "A,A"], "--sites"),
    (["init", "--out", "{new}", "--sites", "A,B,C"], "--sites"),
    (["init", "--out", "{new}", "--sites", "A/x,B"], "--sites"),
    (["init", "--out", "{new}", "--bootstrap", "bogus"], "--bootstrap"),
    (["init", "--out", "{new}", "--sae", "C=SAE_C"], "--sae"),
    (["init", "--out", "{new}", "--sae", "A="], "--sae"),
    (["init", "--out", "{new}", "--sae", "A=x/y"], "--sae"),
    (["init", "--out", "{new}", "--topology", "{missing}"], "no such topology file"),
    (["init", "--out", "{new}", "--topology", "{dir}"], "topology file cannot be read"),
    (["init", "--out", "{new}", "--topology", "{file}"], "not valid TOML"),
    # --- psk --------------------------------------------------------------------------------------
    (["psk", "--link", "A-B", "--out", "{new}", "--bytes", "0"], "--bytes"),
    (["psk", "--link", "A-B", "--out", "{new}", "--bytes", "-128"], "--bytes"),
    (["psk", "--link", "A-B", "--out", "{new}", "--bytes", "129"], "--bytes"),
    (["psk", "--link", "A-B", "--out", "{new}", "--bytes", "many"], "--bytes"),
    (["psk", "--link", "A-B", "--out", "{file}"], "--out"),
    (["psk", "--link", "A-B", "--out", "{dir}"], "--out"),
    (["psk", "--link", "A-B", "--out", "/proc/nope/link.psk"], "--out"),
    (["psk", "--link", "", "--out", "{new}"], "--link"),
    # --- node -------------------------------------------------------------------------------------
    (["node", "--config", "{missing}"], "does not exist"),
    (["node", "--config", "{file}"], "TOML"),
    (["node", "--config", "{dir}", "--log-level", "loud"], "--log-level"),
    (["node", "--config", "{dir}", "--log-format", "xml"], "--log-format"),
    # --- tunnel -----------------------------------------------------------------------------------
    ([*TUNNEL, "--mode", "middle"], "--mode"),
    ([*TUNNEL, "--listen", "nohost"], "--listen"),
    ([*TUNNEL, "--connect", "127.0.0.1:99999"], "--connect"),
    ([*TUNNEL, "--rekey-seconds", "0"], "--rekey-seconds"),
    ([*TUNNEL, "--rekey-seconds", "-1"], "--rekey-seconds"),
    ([*TUNNEL, "--rekey-seconds", "nan"], "--rekey-seconds"),
    ([*TUNNEL, "--rekey-bytes", "0"], "--rekey-bytes"),
    ([*TUNNEL, "--otp-refill-bytes", "0"], "--otp-refill-bytes"),
    ([*TUNNEL, "--qkd-key-bits", "0"], "--qkd-key-bits"),
    ([*TUNNEL, "--qkd-key-bits", "100"], "--qkd-key-bits"),
    ([*TUNNEL, "--record-bytes", "0"], "--record-bytes"),
    ([*TUNNEL, "--record-bytes", "-5"], "--record-bytes"),
    ([*TUNNEL, "--cert", "{missing}"], "--cert"),
    ([*TUNNEL, "--ca", "{dir}"], "--ca"),
    ([*TUNNEL, "--kme-url", "ftp://x"], "--kme-url"),
    ([*TUNNEL, "--peer-sae", "a/b"], "--peer-sae"),
    ([*TUNNEL, "--log-level", "LOUD"], "--log-level"),
    # --- demo (each refused before any node starts) ------------------------------------------------
    (["demo", "--distance-km", "-3"], "--distance-km"),
    (["demo", "--distance-km", "nan"], "--distance-km"),
    (["demo", "--distance-km", "inf"], "--distance-km"),
    (["demo", "--rounds", "0"], "--rounds"),
    (["demo", "--pulses-per-frame", "0"], "--pulses-per-frame"),
    (["demo", "--pulses-per-frame", "nan"], "--pulses-per-frame"),
    (["demo", "--pulses-per-frame", "1500.5"], "--pulses-per-frame"),
    (["demo", "--seed", "-1"], "--seed"),
    (["demo", "--eve", "bogus"], "--eve"),
    (["demo", "--bootstrap", "bogus"], "--bootstrap"),
    (["demo", "--keep", "{file}"], "--keep"),
    (["demo", "--keep", "{full}"], "--keep"),
    # --- dashboard --------------------------------------------------------------------------------
    (["dashboard", "--deployment", "{missing}"], "--deployment"),
    (["dashboard", "--deployment", "{file}"], "--deployment"),
    (["dashboard", "--deployment", "{dir}"], "--deployment"),
    (["dashboard", "--deployment", "{dir}", "--listen", "nohost"], "--listen"),
    (["dashboard", "--deployment", "{dir}", "--listen", "127.0.0.1:99999"], "--listen"),
    (["dashboard", "--deployment", "{dir}", "--listen", "0.0.0.0:0"], "--token"),
    (["dashboard", "--deployment", "{dir}", "--token", "short"], "--token"),
    # --- key export -------------------------------------------------------------------------------
    (["key", "export", "--peer", "SAE_B", "--out", "{new}"], "--config, --etsi, --local"),
    ([*KEY, "--size", "0"], "--size"),
    ([*KEY, "--size", "7"], "--size"),
    ([*KEY, "--size", "-256"], "--size"),
    ([*KEY, "--key-id", "not-a-uuid"], "--key-id"),
    ([*KEY, "--format", "pgp"], "--format"),
    ([*KEY, "--name", "a b"], "--name"),
    ([*KEY, "--out", "{file}"], "--out"),
    ([*KEY, "--tls-cert", "{missing}"], "--tls-cert"),
    (["key", "export", "--peer", "SAE_B", "--out", "{new}", "--local", "{missing}"], "--local"),
    (["key", "export", "--peer", "SAE_B", "--out", "{new}", "--local", "{file}"], "--local"),
    (["key", "export", "--peer", "SAE_B", "--out", "{new}", "--config", "{missing}", "--sae", "SAE_A"],
     "does not exist"),
    (["key", "export", "--peer", "SAE_B", "--out", "{new}", "--config", "{dir}", "--sae", "SAE_A"], "folder"),
    # --- pki ---------------------------------------------------------------------------------------
    (["pki", "crl", "--deployment", "{missing}"], "--deployment"),
    (["pki", "crl", "--deployment", "{dir}"], "--deployment"),
    (["pki", "crl", "--deployment", "{dir}", "--days", "0"], "--days"),
    (["pki", "crl", "--deployment", "{dir}", "--days", "nan"], "--days"),
    (["pki", "renew", "--deployment", "{dir}", "--site", "X", "--days", "-1"], "--days"),
    (["pki", "new-sae", "--site-dir", "{missing}", "--sae", "x"], "--site-dir"),
    (["pki", "new-sae", "--site-dir", "{dir}", "--sae", "x/y"], "--sae"),
    (["pki", "sign-sae", "--site-dir", "{dir}", "--csr", "{missing}", "--out", "{new}"], "--site-dir"),
    (["pki", "status", "--deployment", "{dir}", "--warn-days", "-1"], "--warn-days"),
    (["pki", "renu", "--deployment", "{dir}"], "renew"),
    (["pki", "crl", "--deploymnt", "{dir}"], "--deployment"),
    # --- the command line itself --------------------------------------------------------------------
    (["simulte"], "simulate"),
    (["--verison"], "--version"),
    (["distill", "--distnce-km", "5"], "--distance-km"),
    (["init", "--otu", "{new}"], "--out"),
]


def _fill(argv: list[str], tmp_path: Path) -> list[str]:
    (tmp_path / "empty").mkdir()
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "something").write_text("x")
    (tmp_path / "plain.txt").write_text("not a configuration\n[[[\n")
    places = {"{dir}": tmp_path / "empty", "{full}": tmp_path / "full", "{file}": tmp_path / "plain.txt",
              "{missing}": tmp_path / "missing", "{new}": tmp_path / "new"}
    out = []
    for arg in argv:
        for key, path in places.items():
            arg = arg.replace(key, str(path))
        out.append(arg)
    return out


def run_main(argv: list[str], capsys) -> tuple[int, str, str]:
    """``qkdstack ARGV`` in-process: exit code (argparse's SystemExit included), stdout, stderr."""
    try:
        rc = main(argv)
    except SystemExit as exc:
        rc = exc.code if isinstance(exc.code, int) else 1
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


@pytest.mark.timeout(60)
@pytest.mark.parametrize(("argv", "needle"), CASES, ids=[" ".join(a) for a, _ in CASES])
def test_bad_input_is_one_line_and_exit_2(argv, needle, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    # As on a fresh install (an empty Numba cache): the compile notice must not come before the error.
    monkeypatch.setenv("NUMBA_CACHE_DIR", str(tmp_path / "empty-numba-cache"))
    monkeypatch.setattr(warmup, "_noticed", False)
    argv = _fill(argv, tmp_path)
    rc, _out, err = run_main(argv, capsys)
    lines = err.strip().splitlines()
    assert rc == 2, f"exit code {rc}, stderr {err!r}"
    assert len(lines) == 1, f"stderr is not one line: {err!r}"
    assert "Traceback" not in err
    nested = argv[0] in ("key", "pki") and len(argv) > 1 and not argv[1].startswith("-") and argv[1] != "renu"
    command = f"qkdstack {argv[0]} {argv[1]}" if nested else (
        f"qkdstack {argv[0]}" if argv[0] in COMMANDS else "qkdstack")
    assert lines[0].startswith(f"{command}: error: "), lines[0]
    assert needle in lines[0], f"{needle!r} not in {lines[0]!r}"
    assert "expected one argument" not in lines[0]  # `-1e-6` is a value, not a flag
    assert not (tmp_path / "new").exists(), "a refused command left files behind"


def test_mistyped_flag_names_the_command_and_the_closest_flag(capsys):
    rc, _out, err = run_main(["distill", "--distnce-km", "5"], capsys)
    assert rc == 2
    assert err == "qkdstack distill: error: unknown flag --distnce-km; did you mean --distance-km?\n"


def test_an_abbreviated_flag_and_a_negative_exponent_are_still_understood():
    from qkdstack.cli import build_parser

    args = build_parser(only="keyrate").parse_args(["keyrate", "--dist", "5", "--dark-count", "1e-6"])
    assert args.distance_km == (5.0,) and args.dark_count == 1e-6
    args = build_parser(only="simulate").parse_args(["simulate", "--extra-loss", "-0", "--mu", "5e-1"])
    assert args.extra_loss == 0.0 and args.mu == 0.5


@pytest.mark.parametrize("argv", [["keyrate", "--plot", "rates.jpg2"], ["init", "--otu", "dep"]])
def test_the_installed_command_answers_the_same(argv, tmp_path):
    """The real entry point (a process, `python -m qkdstack.cli`): exit 2, one line, nothing written."""
    done = subprocess.run([sys.executable, "-m", "qkdstack.cli", *argv], cwd=tmp_path, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert "Traceback" not in done.stderr and not list(tmp_path.iterdir())


def test_configuration_fields_refuse_what_the_flags_refuse():
    """The same checks behind `[device] seed` and `--seed`, `[kms] store` and `--store`: one sentence each."""
    from qkdstack.errors import ConfigError
    from qkdstack.node.config import DeviceSection, KmsSection

    with pytest.raises(ConfigError, match=r"^\[device\] seed must be a whole number ≥ 0, got -1$"):
        DeviceSection(seed=-1)
    with pytest.raises(ConfigError, match=r"^\[kms\] store must be sqlite:///PATH"):
        KmsSection(store="mysql://x")


@pytest.mark.parametrize(("argv", "line"), [
    (["simulate", "--distance-km", "-3"],
     "qkdstack simulate: error: --distance-km must be a finite number ≥ 0, got -3.0"),
    (["simulate", "--basis-prob-z", "2"], "qkdstack simulate: error: --basis-prob-z must lie in (0, 1), got 2.0"),
    (["keyrate", "--detector-efficiency", "0"],
     "qkdstack keyrate: error: --detector-efficiency must lie in (0, 1], got 0.0"),
])
def test_a_device_flag_error_names_the_flag_only(argv, line, capsys):
    """One parameter, one name: the message says --distance-km, not the physics layer's length_km."""
    assert main(argv) == 2
    assert capsys.readouterr().err.strip() == line
