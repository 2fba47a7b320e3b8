"""Topologies (network/topology.py) and the deployment ``qkdstack init --topology`` writes for them."""

from __future__ import annotations

import copy
import ipaddress
import shutil
import stat
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from cryptography import x509

from qkdstack.errors import ConfigError
from qkdstack.network.topology import LinkSpec, Topology, load_topology, parse_topology
from qkdstack.node.deployment import network_ports, render_toml, write_deployment, write_network_deployment

QKDSTACK = [sys.executable, "-m", "qkdstack.cli"]
ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples" / "topologies"

LINE4 = {
    "sites": {"A": {"sae": ["SAE_A"]}, "R1": {}, "R2": {}, "B": {"sae": ["SAE_B"]}},
    "links": [
        {"transmitter": "A", "receiver": "R1", "distance_km": 20},
        {"transmitter": "R1", "receiver": "R2"},
        {"transmitter": "R2", "receiver": "B", "distance_km": 15.5},
    ],
}


def _with(**changes):
    data = copy.deepcopy(LINE4)
    for key, value in changes.items():
        data[key] = value
    return data


def _links(*extra):
    return [*copy.deepcopy(LINE4["links"]), *extra]


def test_good_topology_parses_with_its_queries():
    topo = parse_topology(copy.deepcopy(LINE4), "line4.toml")
    assert isinstance(topo, Topology)
    assert list(topo.sites) == ["A", "R1", "R2", "B"]
    assert topo.sites["A"].sae == ("SAE_A",) and topo.sites["R1"].sae == ()
    assert topo.sites["A"].kme_url == "" and topo.sites["A"].address == "127.0.0.1"
    assert topo.neighbours("R1") == ["A", "R2"] and topo.neighbours("A") == ["R1"]
    assert topo.link_between("R1", "A") is topo.links[0] and topo.link_between("A", "B") is None
    assert topo.site_of_sae("SAE_B") == "B" and topo.site_of_sae("SAE_X") is None
    assert [link.link_id for link in topo.links_of("R2")] == ["R1|R2", "B|R2"]
    link = topo.links[2]
    assert link.ends == ("R2", "B") and link.other("B") == "R2" and link.other("R2") == "B"
    assert link.role_of("B") == "receiver" and link.role_of("R2") == "transmitter"
    assert dict(link.device) == {"distance_km": 15.5} and dict(topo.links[1].device) == {}
    with pytest.raises(ValueError):
        link.other("A")
    assert hash(link) == hash(LinkSpec("R2", "B"))


def test_the_issue_minimal_format_as_written(tmp_path):
    path = tmp_path / "topology.toml"
    path.write_text('[sites.A]\nsae = ["SAE_A"]\n[sites.R1]\n[sites.B]\nsae = ["SAE_B"]\n\n'
                    '[[links]]\ntransmitter = "A"\nreceiver = "R1"\ndistance_km = 20\n\n'
                    '[[links]]\ntransmitter = "R1"\nreceiver = "B"\n')
    topo = load_topology(path)
    assert topo.neighbours("R1") == ["A", "B"] and topo.links[0].device["distance_km"] == 20


def test_to_toml_round_trips_with_kme_urls():
    topo = parse_topology(copy.deepcopy(LINE4), "line4.toml")
    filled = topo.with_kme_urls({name: f"https://127.0.0.1:{9000 + i}" for i, name in enumerate(topo.sites)})
    again = parse_topology(tomllib.loads(filled.to_toml()), "network.toml")
    assert again == filled and again.sites["R2"].kme_url == "https://127.0.0.1:9002"


BAD = [
    ("unknown site in a link",
     _with(links=_links({"transmitter": "B", "receiver": "R9"})),
     "line4.toml: [[links]] entry 4: receiver 'R9' is not a site"),
    ("unknown transmitter",
     _with(links=[{"transmitter": "X", "receiver": "A"}]),
     "[[links]] entry 1: transmitter 'X' is not a site"),
    ("site linked to itself",
     _with(links=_links({"transmitter": "R1", "receiver": "R1"})),
     "[[links]] entry 4: site 'R1' is linked to itself"),
    ("duplicate link, same direction",
     _with(links=_links({"transmitter": "A", "receiver": "R1"})),
     "[[links]] entry 4: 'A'–'R1' duplicates entry 1"),
    ("duplicate link, other direction",
     _with(links=_links({"transmitter": "B", "receiver": "R2"})),
     "[[links]] entry 4: 'B'–'R2' duplicates entry 3"),
    ("disconnected SAEs",
     _with(links=_links()[:2]),
     "[sites.B]: no chain of links joins it to site 'A', so its SAEs (SAE_B) can never share a key"),
    ("disconnected relay site",
     _with(sites={**LINE4["sites"], "R3": {}}),
     "[sites.R3]: no chain of links joins it to site 'A', so the network is not connected"),
    ("SAE at two sites",
     _with(sites={**LINE4["sites"], "R1": {"sae": ["SAE_A"]}}),
     "[sites.R1]: sae 'SAE_A' is already at site 'A'"),
    ("the relay's reserved SAE ID",
     _with(sites={**LINE4["sites"], "B": {"sae": ["qkdstack-relay"]}}),
     "[sites.B]: sae 'qkdstack-relay' is reserved for the key relay"),
    ("sae not a list",
     _with(sites={**LINE4["sites"], "A": {"sae": "SAE_A"}}),
     "[sites.A]: sae must be a list of SAE ID strings, got 'SAE_A'"),
    ("sae of numbers",
     _with(sites={**LINE4["sites"], "A": {"sae": [1]}}),
     "[sites.A]: sae must be a list of SAE ID strings"),
    ("distance of the wrong type",
     _with(links=[{"transmitter": "A", "receiver": "R1", "distance_km": "20"}, *_links()[1:]]),
     "[[links]] entry 1: [device] distance_km must be a number, got '20'"),
    ("pulses as a float",
     _with(links=[*_links()[:2], {"transmitter": "R2", "receiver": "B", "pulses_per_frame": 1e8}]),
     "[[links]] entry 3: [device] pulses_per_frame must be a TOML integer"),
    ("device value out of range",
     _with(links=[{"transmitter": "A", "receiver": "R1", "distance_km": -1}, *_links()[1:]]),
     "[[links]] entry 1: [device] distance_km"),
    ("transmitter not a string",
     _with(links=[{"transmitter": 1, "receiver": "R1"}, *_links()[1:]]),
     "[[links]] entry 1: transmitter must be a site name (a string), got 1"),
    ("receiver missing",
     _with(links=[{"transmitter": "A"}, *_links()[1:]]),
     "[[links]] entry 1: receiver is required"),
    ("unknown link field",
     _with(links=[{"transmitter": "A", "receiver": "R1", "distanse_km": 3}, *_links()[1:]]),
     "[[links]] entry 1: unknown field 'distanse_km'"),
    ("unknown site field",
     _with(sites={**LINE4["sites"], "R1": {"saes": ["X"]}}),
     "[sites.R1]: unknown field 'saes'"),
    ("site not a table",
     _with(sites={**LINE4["sites"], "R1": 3}),
     "[sites.R1] must be a table"),
    ("bad site name",
     _with(sites={**LINE4["sites"], "R 1": {}}),
     "[sites.R 1]: a site name must be letters, digits, '-' or '_'"),
    ("unknown top-level key",
     _with(link=[]),
     "line4.toml: unknown top-level key 'link'"),
    ("links not an array",
     _with(links={"transmitter": "A", "receiver": "R1"}),
     "[[links]] must be an array of tables"),
    ("no links",
     _with(links=[]),
     "[[links]] must give at least one link"),
    ("one site",
     {"sites": {"A": {}}, "links": []},
     "[sites] must name at least two sites, got 1"),
    ("no sites",
     {"links": []},
     "[sites] must be tables [sites.NAME]"),
    ("kme_url not https",
     _with(sites={**LINE4["sites"], "R1": {"kme_url": "http://127.0.0.1:9000"}}),
     "[sites.R1]: kme_url must be \"https://HOST:PORT\""),
    ("host of the wrong type",
     _with(sites={**LINE4["sites"], "R1": {"host": 10}}),
     "[sites.R1]: host must be a string"),
]


@pytest.mark.parametrize(("case", "data", "message"), BAD, ids=[case for case, _, _ in BAD])
def test_bad_topology_is_one_sentence_naming_the_entry(case, data, message):
    with pytest.raises(ConfigError) as info:
        parse_topology(data, "line4.toml")
    text = str(info.value)
    assert message in text, text
    assert text.startswith("line4.toml: ") and "\n" not in text


def test_load_topology_reports_bad_toml_and_missing_file(tmp_path):
    bad = tmp_path / "t.toml"
    bad.write_text("[sites.A\n")
    with pytest.raises(ConfigError, match=r"^t\.toml: not valid TOML"):
        load_topology(bad)
    with pytest.raises(ConfigError, match="no such topology file"):
        load_topology(tmp_path / "missing.toml")


# --------------------------------------------------------------------------------------------
# qkdstack init --topology


def _init(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*QKDSTACK, "init", *args], capture_output=True, text=True, timeout=120, cwd=ROOT)


@pytest.fixture(scope="module")
def line4(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("line4") / "dep"
    done = _init("--topology", "examples/topologies/line4.toml", "--out", str(out), "--base-port", "17100")
    assert done.returncode == 0, done.stderr
    assert "next: see" in done.stdout
    return out


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_init_topology_writes_every_file_with_secrets_0600(line4):
    topo = load_topology(EXAMPLES / "line4.toml")
    expected = ["network.toml", "README.txt", "network-ca/ca.pem", "network-ca/ca.key"]
    secret = ["network-ca/ca.key"]
    for name, spec in topo.sites.items():
        expected += [f"{name}/{f}" for f in ("site.toml", "network.toml", "network/ca.pem", "network/kme.pem",
                                            "network/kme.key", "tls/ca.pem", "tls/ca.key", "tls/kme.pem",
                                            "tls/kme.key")]
        secret += [f"{name}/network/kme.key", f"{name}/tls/ca.key", f"{name}/tls/kme.key"]
        for sae in spec.sae:
            expected += [f"{name}/sae/{sae}.pem", f"{name}/sae/{sae}.key", f"{name}/sae/{sae}.psk",
                         f"{name}/tls/skip.psk"]
            secret += [f"{name}/sae/{sae}.key", f"{name}/sae/{sae}.psk", f"{name}/tls/skip.psk"]
        for peer in topo.neighbours(name):
            expected.append(f"{name}/links/{peer}/link.psk")
            secret.append(f"{name}/links/{peer}/link.psk")
    missing = [f for f in expected if not (line4 / f).is_file()]
    assert not missing
    loose = {f: oct(_mode(line4 / f)) for f in secret if _mode(line4 / f) != 0o600}
    assert not loose
    readme = (line4 / "README.txt").read_text()
    for name in topo.sites:
        assert f"qkdstack node --config {line4 / name / 'site.toml'}" in readme
    assert "SAE_B/enc_keys" in readme


def test_init_topology_network_toml_has_every_kme_url(line4):
    text = (line4 / "network.toml").read_text()
    network = load_topology(line4 / "network.toml")
    user = load_topology(EXAMPLES / "line4.toml")
    assert network.links == user.links and list(network.sites) == list(user.sites)
    for name, spec in network.sites.items():
        assert (line4 / name / "network.toml").read_text() == text
        site = tomllib.loads((line4 / name / "site.toml").read_text())
        assert spec.kme_url == f"https://{site['network']['listen']}"
        assert site["network"]["topology"] == "network.toml"


def test_init_topology_site_toml_has_one_links_entry_per_link(line4):
    topo = load_topology(EXAMPLES / "line4.toml")
    listeners: dict[str, str] = {}
    link_tables: dict[str, list[dict]] = {}
    for name in topo.sites:
        site = tomllib.loads((line4 / name / "site.toml").read_text())
        assert site["site"] == {"name": name, "data_dir": "data"}
        entries = site["links"]
        assert [e["peer"] for e in entries] == [link.other(name) for link in topo.links_of(name)]
        for entry, link in zip(entries, topo.links_of(name), strict=True):
            assert entry["role"] == link.role_of(name)
            assert set(entry["link"]) == {"classical", "quantum", "kms"}
            assert entry["auth"] == {"psk_file": f"links/{entry['peer']}/link.psk"}
            assert entry["device"]["distance_km"] == link.device["distance_km"]
            assert isinstance(entry["device"]["pulses_per_frame"], int)
            link_tables.setdefault(link.link_id, []).append(entry["link"])
        for label, address in [("network", site["network"]["listen"]), ("etsi", site["kms"]["etsi_listen"]),
                               ("admin", site["admin"]["listen"])] + (
                [("skip", site["kms"]["skip_listen"])] if topo.sites[name].sae else []):
            assert address not in listeners, (name, label, listeners.get(address))
            listeners[address] = f"{name} {label}"
        assert site["kms"]["sae_ids"] == list(topo.sites[name].sae)
    for link_id, (tx_side, rx_side) in link_tables.items():
        assert tx_side == rx_side  # the receiver listens where the transmitter connects
        for key, address in tx_side.items():
            assert address not in listeners, (link_id, key, listeners.get(address))
            listeners[address] = f"{link_id} {key}"
    ports = sorted(int(a.rpartition(":")[2]) for a in listeners)
    assert len(ports) == len(set(ports)) and ports[0] >= 17100


def test_init_topology_psk_is_one_per_link_identical_at_both_ends(line4):
    topo = load_topology(EXAMPLES / "line4.toml")
    seen = set()
    for link in topo.links:
        a = (line4 / link.transmitter / "links" / link.receiver / "link.psk").read_bytes()
        b = (line4 / link.receiver / "links" / link.transmitter / "link.psk").read_bytes()
        assert a == b
        assert f"link: {'-'.join(sorted(link.ends))}\n".encode() in a
        seen.add(a)
    assert len(seen) == len(topo.links)


def test_init_topology_sites_load_as_multi_link_configurations(line4):
    """The lead's loader (node/site_config.py) reads what init writes, files included."""
    from qkdstack.node.site_config import load_site_config

    topo = load_topology(EXAMPLES / "line4.toml")
    for name in topo.sites:
        config = load_site_config(line4 / name / "site.toml")
        assert config.multi_link and config.name == name
        assert list(config.peers) == [link.other(name) for link in topo.links_of(name)]


def test_init_topology_kme_certificates_come_from_the_network_ca(line4):
    ca = x509.load_pem_x509_certificate((line4 / "network-ca" / "ca.pem").read_bytes())
    for name in ("A", "R1"):
        cert = x509.load_pem_x509_certificate((line4 / name / "network" / "kme.pem").read_bytes())
        cert.verify_directly_issued_by(ca)
        cn = cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value
        assert cn == f"KME_{name}"
        usages = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        assert x509.ExtendedKeyUsageOID.CLIENT_AUTH in usages and x509.ExtendedKeyUsageOID.SERVER_AUTH in usages
        assert (line4 / name / "network" / "ca.pem").read_bytes() == (line4 / "network-ca" / "ca.pem").read_bytes()


BAD_FILES = [
    ('[sites.A]\n[sites.B]\n[[links]]\ntransmitter = "A"\nreceiver = "R9"\n',
     "topology.toml: [[links]] entry 1: receiver 'R9' is not a site"),
    ('[sites.A]\n[sites.B]\n[[links]]\ntransmitter = "A"\nreceiver = "A"\n',
     "[[links]] entry 1: site 'A' is linked to itself"),
    ('[sites.A]\n[sites.B]\n[[links]]\ntransmitter = "A"\nreceiver = "B"\n'
     '[[links]]\ntransmitter = "B"\nreceiver = "A"\n', "[[links]] entry 2: 'B'–'A' duplicates entry 1"),
    ('[sites.A]\nsae = ["S1"]\n[sites.B]\n[sites.C]\nsae = ["S2"]\n[[links]]\ntransmitter = "A"\nreceiver = "B"\n',
     "[sites.C]: no chain of links joins it to site 'A'"),
    ('[sites.A]\n[sites.B]\n[[links]]\ntransmitter = "A"\nreceiver = "B"\ndistance_km = "far"\n',
     "[[links]] entry 1: [device] distance_km must be a number"),
    ('[sites.A\n', "topology.toml: not valid TOML"),
]


@pytest.mark.parametrize(("text", "message"), BAD_FILES)
def test_init_bad_topology_is_one_line_and_exit_2(tmp_path, text, message):
    path = tmp_path / "topology.toml"
    path.write_text(text)
    out = tmp_path / "dep"
    done = _init("--topology", str(path), "--out", str(out))
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], done.stderr
    assert "Traceback" not in done.stderr and not out.exists()


@pytest.mark.parametrize(("flags", "message"), [
    (["--sites", "A,B"], "--sites does not apply with --topology"),
    (["--sae", "A=X"], "--sae does not apply with --topology"),
    (["--base-port", "65530"], "--base-port must lie in 1..65511"),
    (["--bootstrap", "nope"], "invalid choice"),
])
def test_init_topology_refuses_flags_before_writing(tmp_path, flags, message):
    out = tmp_path / "dep"
    done = _init("--topology", "examples/topologies/line4.toml", "--out", str(out), *flags)
    assert done.returncode == 2 and message in done.stderr, done.stderr
    assert "Traceback" not in done.stderr and not out.exists()


def test_ports_are_links_then_sites_from_the_base_port():
    topo = load_topology(EXAMPLES / "ring5.toml")
    links, sites = network_ports(topo, 9000)
    assert links["A|R1"] == {"classical": 9000, "quantum": 9001, "kms": 9002}
    assert sites["A"] == {"network": 9015, "etsi": 9016, "skip": 9017, "admin": 9018}
    every = [p for table in (*links.values(), *sites.values()) for p in table.values()]
    assert sorted(every) == list(range(9000, 9000 + 3 * 5 + 4 * 5))
    with pytest.raises(ConfigError, match="--base-port"):
        network_ports(topo, 65535 - 30)


def test_ring5_example_has_two_paths_between_the_sae_sites():
    topo = load_topology(EXAMPLES / "ring5.toml")
    assert len(topo.sites) == 5 and len(topo.links) == 5
    a, b = topo.site_of_sae("SAE_A"), topo.site_of_sae("SAE_B")
    assert all(len(topo.neighbours(n)) == 2 for n in topo.sites)  # a ring: every site has two neighbours
    assert a and b and topo.link_between(a, b) is None


def test_site_host_goes_into_listeners_and_certificates(tmp_path):
    data = copy.deepcopy(LINE4)
    data["sites"]["R1"]["host"] = "10.0.0.2"
    with pytest.raises(ConfigError, match=r"^\[\[links\]\] entry 1 \(A–R1\): the receiver's host 10\.0\.0\.2 is not "
                       r"loopback.*set simulation_testbed = true"):
        write_network_deployment(parse_topology(data, "t.toml"), tmp_path / "refused", base_port=18000)
    assert not (tmp_path / "refused").exists()
    data["links"][0]["simulation_testbed"] = True
    topo = parse_topology(data, "t.toml")
    write_network_deployment(topo, tmp_path / "dep", base_port=18000)
    r1 = tomllib.loads((tmp_path / "dep" / "R1" / "site.toml").read_text())
    a = tomllib.loads((tmp_path / "dep" / "A" / "site.toml").read_text())
    assert r1["network"]["listen"].startswith("10.0.0.2:") and r1["kms"]["etsi_listen"].startswith("10.0.0.2:")
    # R1 receives A's link, so A connects to R1's address; R1 transmits to R2, whose listeners are loopback.
    assert a["links"][0]["link"]["classical"].startswith("10.0.0.2:")
    assert a["links"][0]["link"] == r1["links"][0]["link"]
    assert r1["links"][1]["link"]["classical"].startswith("127.0.0.1:")
    assert r1["admin"]["listen"].startswith("127.0.0.1:")  # served without TLS: never off loopback
    from qkdstack.node.site_config import load_site_config

    assert load_site_config(tmp_path / "dep" / "R1" / "site.toml").network.listen.startswith("10.0.0.2:")
    cert = x509.load_pem_x509_certificate((tmp_path / "dep" / "R1" / "network" / "kme.pem").read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert ipaddress.ip_address("10.0.0.2") in san.get_values_for_type(x509.IPAddress)
    network = load_topology(tmp_path / "dep" / "network.toml")
    assert network.sites["R1"].host == "10.0.0.2" and network.sites["R1"].kme_url.startswith("https://10.0.0.2:")


def test_pki_bootstrap_gives_each_site_one_identity_for_all_its_links(tmp_path):
    from qkdstack.node.site_config import load_site_config

    write_network_deployment(load_topology(EXAMPLES / "line4.toml"), tmp_path / "dep", bootstrap="pki",
                             base_port=18100)
    config = load_site_config(tmp_path / "dep" / "R1" / "site.toml")
    assert [link.auth.bootstrap for link in config.links] == ["pki", "pki"]
    assert not (tmp_path / "dep" / "R1" / "links").exists()
    assert _mode(tmp_path / "dep" / "R1" / "pki" / "classical.key") == 0o600


@pytest.mark.skipif(shutil.which("gpg") is None, reason="GnuPG (gpg) is not installed")
def test_pgp_bootstrap_names_each_links_peer_key(tmp_path):
    from qkdstack.node.site_config import load_site_config

    write_network_deployment(load_topology(EXAMPLES / "line4.toml"), tmp_path / "dep", bootstrap="pgp",
                             base_port=18200)
    configs = {n: load_site_config(tmp_path / "dep" / n / "site.toml") for n in ("A", "R1", "R2")}
    own = {n: c.links[0].auth.own_fingerprint for n, c in configs.items()}
    assert [link.auth.peer_fingerprint for link in configs["R1"].links] == [own["A"], own["R2"]]


def test_render_toml_writes_arrays_of_tables_with_sub_tables():
    text = render_toml({"site": {"name": "R1", "skip": None},
                        "links": [{"peer": "A", "role": "receiver", "link": {"kms": "127.0.0.1:1"}, "auth": {"x": 1}},
                                  {"peer": "B", "link": {"kms": "127.0.0.1:2"}}]})
    assert tomllib.loads(text) == {"site": {"name": "R1"},
                                   "links": [{"peer": "A", "role": "receiver", "link": {"kms": "127.0.0.1:1"},
                                              "auth": {"x": 1}},
                                             {"peer": "B", "link": {"kms": "127.0.0.1:2"}}]}


def test_two_site_init_is_unchanged(tmp_path):
    """The two-site writer still writes a top-level [link] and [site] role/peer, and no [[links]]."""
    write_deployment(tmp_path / "dep", ["A", "B"], base_port=18300, pulses_per_frame=100_000)
    a = tomllib.loads((tmp_path / "dep" / "A" / "site.toml").read_text())
    assert a["site"]["role"] == "transmitter" and a["site"]["peer"] == "B"
    assert "links" not in a and "network" not in a and a["link"]["classical"] == "127.0.0.1:18300"
    assert (tmp_path / "dep" / "B" / "link.psk").read_bytes() == (tmp_path / "dep" / "A" / "link.psk").read_bytes()
