import json

from qkdstack.cli import main

GOOD = ["--distance-km", "25", "--mu", "0.5", "--decoys", "0.25,0", "--intensity-probs", "0.4,0.4,0.2",
        "--basis-prob-z", "0.8", "--pulses", "6e7", "--seed", "3"]


def test_distill_json_reports_a_key_and_its_figures(capsys):
    assert main(["distill", *GOOD, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    r = out["rounds"][0]
    assert out["summary"]["accepted"] == 1 and r["key_bits"] > 0
    assert 1.0 < r["cascade_efficiency"] < 1.3
    assert r["secret_key_rate_bit_per_s"] == r["secret_key_rate_bit_per_pulse"] * 1e9
    assert set(r["stage_seconds"]) >= {"sifting", "cascade", "amplification"}


def test_distill_with_eavesdropper_aborts_every_round(capsys):
    assert main(["distill", *GOOD, "--rounds", "2", "--eve", "intercept-resend:0.3"]) == 1
    out = capsys.readouterr().out
    assert out.count("ABORTED") == 2 and "0/2 rounds accepted" in out


def test_distill_bad_parameters_exit_2(capsys):
    assert main(["distill", "--distance-km", "-3"]) == 2
    assert main(["distill", *GOOD, "--rounds", "0"]) == 2
    assert "rounds" in capsys.readouterr().err
