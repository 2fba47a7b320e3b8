"""Node configuration: every bad value gets one sentence naming [section] field."""

from pathlib import Path

import pytest

from qkdstack.errors import ConfigError
from qkdstack.node.config import load_config, parse_config

SITE = {"name": "A", "role": "transmitter", "peer": "B"}
AUTH = {"bootstrap": "psk", "psk_file": "link.psk"}


def _parse(**sections):
    return parse_config({"site": SITE, "auth": AUTH, **sections}, Path("/etc/qkd/site-a.toml"))


def test_defaults_are_valid_and_paths_resolve_against_the_file():
    cfg = _parse()
    assert cfg.device.params().source.intensities == (0.5, 0.25, 0.0)
    assert cfg.resolve("link.psk") == Path("/etc/qkd/link.psk")
    assert cfg.resolve("/abs/x") == Path("/abs/x")


@pytest.mark.parametrize(
    ("sections", "expected"),
    [
        ({"site": {**SITE, "role": "sender"}}, "[site] role must be one of transmitter, receiver"),
        ({"site": {**SITE, "peer": "A"}}, "[site] peer must differ"),
        ({"device": {"distance_km": -1}}, "[device] distance_km must be"),
        ({"device": {"distance_km": "far"}}, "[device] distance_km must be a number"),
        ({"device": {"basis_prob_z": 1.5}}, "[device] basis_prob_z must lie in"),
        ({"device": {"detector_efficiency": 0}}, "[device] detector_efficiency must lie in"),
        ({"device": {"intensity_probs": [0.5, 0.5, 0.5]}}, "[device] intensity_probs must sum to 1"),
        ({"device": {"distnce_km": 3}}, "[device] has unknown field 'distnce_km'"),
        ({"link": {"classical": "localhost"}}, "[link] classical must be HOST:PORT"),
        ({"protocol": {"eps_sec": 2}}, "[protocol] eps_sec must lie in (0, 1)"),
        ({"auth": {"bootstrap": "pki"}}, "[auth] ca_certs is required with bootstrap = 'pki'"),
        ({"auth": {"bootstrap": "kerberos"}}, "[auth] bootstrap must be one of psk, pki, pgp"),
        ({"kms": {"key_size_bits": 100}}, "[kms] key_size_bits must be a positive multiple of 8"),
        ({"kms": {"store": "mysql://x"}}, "[kms] store must be sqlite:///PATH or postgresql://"),
        ({"kms": {"local_users": ["root"]}}, "[kms] local_users entries must be UID:SAE_ID"),
        ({"colour": {}}, "unknown section [colour]"),
    ],
)
def test_bad_values_name_the_field(sections, expected):
    with pytest.raises(ConfigError) as info:
        _parse(**sections)
    message = str(info.value)
    assert message.startswith("site-a.toml: ") and expected in message
    assert "\n" not in message and "Traceback" not in message


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "none.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[site\nname = 1")
    with pytest.raises(ConfigError, match=r"bad\.toml is not valid TOML"):
        load_config(bad)
