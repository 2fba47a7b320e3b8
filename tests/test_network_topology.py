"""Topologies (network/topology.py) and the deployment ``qkdstack init --topology`` writes for them."""

from __future__ import annotations

import copy
import tomllib

import pytest

from qkdstack.errors import ConfigError
from qkdstack.network.topology import LinkSpec, Topology, load_topology, parse_topology

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
