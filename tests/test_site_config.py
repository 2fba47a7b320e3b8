"""The multi-link site.toml (node/site_config.py): links merged over the site's defaults, one-sentence errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from qkdstack.errors import ConfigError
from qkdstack.node.site_config import load_site_config

SITE = """
[site]
name = "R1"
data_dir = "data"

[kms]
store = "sqlite:///data/keys.db"
etsi_listen = "127.0.0.1:{p0}"

[device]
distance_km = 10
pulses_per_frame = 30000000

[auth]
bootstrap = "psk"

[network]
listen = "127.0.0.1:{p1}"
topology = "network.toml"
tls_cert = "network/kme.pem"
tls_key = "network/kme.key"
ca_cert = "network/ca.pem"

[[links]]
peer = "A"
role = "receiver"
[links.link]
classical = "127.0.0.1:{p2}"
quantum = "127.0.0.1:{p3}"
kms = "127.0.0.1:{p4}"
[links.auth]
psk_file = "links/A/link.psk"

[[links]]
peer = "R2"
role = "transmitter"
[links.link]
classical = "127.0.0.1:{p5}"
quantum = "127.0.0.1:{p6}"
kms = "127.0.0.1:{p7}"
[links.device]
distance_km = 30
[links.auth]
psk_file = "links/R2/link.psk"
"""


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "site.toml"
    path.write_text(text.format(**{f"p{i}": 31000 + i for i in range(8)}))
    return path


def test_each_link_is_a_node_configuration_over_the_site_defaults(tmp_path: Path) -> None:
    site = load_site_config(_write(tmp_path, SITE), check_files=False)
    assert site.multi_link and site.name == "R1" and site.peers == ("A", "R2")
    a, r2 = site.links
    assert (a.site.role, r2.site.role) == ("receiver", "transmitter")
    assert a.device.distance_km == 10 and r2.device.distance_km == 30  # a link's [device] overrides the default
    assert a.device.pulses_per_frame == r2.device.pulses_per_frame == 30_000_000
    assert a.data_dir == tmp_path / "data" / "links" / "A" and r2.data_dir == tmp_path / "data" / "links" / "R2"
    assert a.auth.psk_file == "links/A/link.psk" and r2.auth.psk_file == "links/R2/link.psk"
    assert a.kms is r2.kms or a.kms == r2.kms  # one key store and one ETSI 014 listener per site
    assert site.data_dir == tmp_path / "data"


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda s: s.replace('peer = "R2"', 'peer = "A"'), "entry 2: a second link to A"),
        (lambda s: s.replace('role = "transmitter"', 'role = "sender"'), "[[links]] entry 2 (peer R2): [site] role"),
        (lambda s: s.replace("distance_km = 30", "distance_km = -4"), "[[links]] entry 2 (peer R2): [device]"),
        (lambda s: s.replace('data_dir = "data"', 'data_dir = "data"\nrole = "receiver"'), "[site] role belongs"),
        (lambda s: s + '\n[link]\nclassical = "127.0.0.1:1"\n', "no top-level [link]"),
        (lambda s: s.replace('peer = "R2"\n', 'peer = "R2"\ncolour = "red"\n'), "unknown field 'colour'"),
        (lambda s: s.replace('listen = "127.0.0.1:{p1}"', 'listen = "127.0.0.1:{p2}"'), "each listener needs"),
        (lambda s: s.replace('topology = "network.toml"\n', ""), "[network] topology is required"),
        (lambda s: s.replace("kms = \"127.0.0.1:{p4}\"\n", "kms = \"127.0.0.1:{p4}\"\nspeed = 3\n"),
         "entry 1 (peer A): [link]"),
    ],
)
def test_bad_multi_link_site_is_one_sentence_naming_the_entry(tmp_path: Path, edit, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_site_config(_write(tmp_path, edit(SITE)), check_files=False)
    text = str(info.value)
    assert message in text, text
    assert "\n" not in text


def test_a_multi_link_site_names_a_missing_network_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"\[network\] tls_cert names .* which is not a file"):
        load_site_config(_write(tmp_path, SITE))
