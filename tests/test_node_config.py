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
        ({"kms": {"local_socket": "kms.sock"}}, "[kms] local_users must admit at least one"),
        ({"kms": {"tls_cert": "tls/kme.pem", "ca_cert": "tls/ca.pem"}}, "[kms] tls_key is required when"),
        ({"kms": {"tls_key": "tls/kme.key"}}, "[kms] tls_cert is required when"),
        ({"link": {"quantum": "127.0.0.1:7100"}}, "[link] quantum must differ from [link] classical"),
        ({"device": {"eve": "martian"}}, "[device] eve must be none,"),
        ({"site": {**SITE, "role": "receiver"}, "kms": {"etsi_listen": "127.0.0.1:7102", "tls_cert": "c.pem",
                                                        "tls_key": "k.pem", "ca_cert": "ca.pem"}},
         "[kms] etsi_listen must differ from [link] kms"),
        ({"device": {"simulation_testbed": "yes"}}, "[device] simulation_testbed must be true or false"),
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


@pytest.mark.parametrize(
    ("section", "name", "value"),
    [
        ("device", "pulses_per_frame", 1.5e8),
        ("device", "pulses_per_frame", 1e8),
        ("device", "seed", 7.0),
        ("protocol", "rounds", 3.0),
        ("kms", "key_size_bits", 256.0),
        ("kms", "capacity_keys", 1e5),
    ],
)
def test_integer_fields_refuse_floats_even_integral_ones(section, name, value):
    """Every integer field alike: a float (1.5e8) is refused with the integer to write instead (150_000_000)."""
    with pytest.raises(ConfigError) as info:
        _parse(**{section: {name: value}})
    assert f"[{section}] {name} must be a TOML integer such as {int(value):_}" in str(info.value)


def test_integer_fields_take_integers_and_float_fields_take_both():
    cfg = _parse(device={"pulses_per_frame": 150_000_000, "distance_km": 25, "rep_rate_hz": 1e9})
    assert cfg.device.pulses_per_frame == 150_000_000 and cfg.device.distance_km == 25.0
    assert isinstance(cfg.device.distance_km, float)


@pytest.mark.parametrize("address", ["127.0.0.1:7101", "127.8.9.10:7101", "[::1]:7101", "localhost:7101"])
def test_quantum_channel_on_loopback_is_accepted(address):
    cfg = _parse(link={"quantum": address})
    assert cfg.quantum_on_loopback
    assert not cfg.device.simulation_testbed


@pytest.mark.parametrize("address", ["10.0.0.2:7101", "0.0.0.0:7101", "[::]:7101", "[2001:db8::1]:7101",
                                     "site-b.example.org:7101", "127.0.0.1.example.org:7101"])
def test_quantum_channel_off_loopback_needs_a_declared_testbed(address):
    """The light crosses in clear (photon number, basis, bit): off this host only in a declared simulation test bed."""
    with pytest.raises(ConfigError) as info:
        _parse(link={"quantum": address})
    message = str(info.value)
    assert message.startswith(f"site-a.toml: [link] quantum {address} is not a loopback address")
    assert "raw key" in message and "[device] simulation_testbed = true" in message and "\n" not in message
    cfg = _parse(link={"quantum": address}, device={"simulation_testbed": True})
    assert not cfg.quantum_on_loopback and cfg.device_labels["simulation_testbed"]
    assert "over the network (simulation test bed)" in cfg.key_caveats[0]


def test_key_labels_say_simulated_and_seeded():
    plain = _parse()
    assert plain.device.simulated and not plain.device.seeded
    assert plain.device_labels == {
        "simulated": True, "seeded": False, "simulation_testbed": False, "quantum_on_loopback": True,
        "caveats": list(plain.key_caveats),
    }
    assert len(plain.key_caveats) == 1 and "not secret from anyone who can read it" in plain.key_caveats[0]
    seeded = _parse(device={"seed": 2026})
    assert seeded.device.seeded and len(seeded.key_caveats) == 2
    assert "PCG64" in seeded.key_caveats[1] and "2026" not in " ".join(seeded.key_caveats)  # never the seed itself
