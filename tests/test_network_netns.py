"""The four-site line once more, each site in its own network namespace with its own address.

Nothing in a deployment may assume one host: each site's node runs inside its own namespace (``ip netns``)
on its own address of a bridged subnet, and reaches its neighbours only over that subnet. The quantum
channel then leaves the host's loopback, which the configuration refuses unless the links say they are
a simulation test bed (``simulation_testbed = true``), as this test's topology does. Namespaces need
root; the test says why it skips where they are unavailable.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import secrets
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from _network_support import dec_keys, deploy, enc_keys, etsi_client, keys_of, running, start_site, wait_links_up
from qkdstack.network.site_kme import PATH_EXTENSION as RELAY_PATH_EXTENSION

pytestmark = pytest.mark.slow

SITES = ("A", "R1", "R2", "B")


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check)


def _why_not() -> str | None:
    if os.geteuid() != 0:
        return "network namespaces need root (ip netns add)"
    probe = f"qkdprobe{secrets.token_hex(3)}"
    try:
        result = _ip("netns", "add", probe, check=False)
    except FileNotFoundError:
        return "the ip command (iproute2) is not installed"
    if result.returncode != 0:
        return f"ip netns add failed here: {result.stderr.strip()}"
    _ip("netns", "delete", probe, check=False)
    return None


@contextlib.contextmanager
def namespaces(subnet: int) -> Iterator[dict[str, tuple[str, str]]]:
    """One namespace per site on a bridge in the root namespace: {site: (namespace, address)}; removed after."""
    tag = secrets.token_hex(2)
    bridge = f"qkbr{tag}"
    made: dict[str, tuple[str, str]] = {}
    try:
        _ip("link", "add", bridge, "type", "bridge")
        _ip("addr", "add", f"10.{subnet}.0.254/24", "dev", bridge)
        _ip("link", "set", bridge, "up")
        for i, site in enumerate(SITES, 1):
            ns, host_end = f"qkd{tag}{site}", f"qkv{tag}{i}"
            _ip("netns", "add", ns)
            made[site] = (ns, f"10.{subnet}.0.{i}")
            _ip("link", "add", host_end, "type", "veth", "peer", "name", "eth0", "netns", ns)
            _ip("link", "set", host_end, "master", bridge, "up")
            _ip("-n", ns, "addr", "add", f"10.{subnet}.0.{i}/24", "dev", "eth0")
            _ip("-n", ns, "link", "set", "eth0", "up")
            _ip("-n", ns, "link", "set", "lo", "up")
        yield made
    finally:
        for ns, _ in made.values():
            _ip("netns", "delete", ns, check=False)
        _ip("link", "delete", bridge, check=False)


def test_the_line_runs_with_every_site_in_its_own_network_namespace(tmp_path: Path) -> None:
    why = _why_not()
    if why is not None:
        pytest.skip(why)
    subnet = 100 + secrets.randbelow(100)
    with namespaces(subnet) as spaces:
        sites = "\n".join(
            f'[sites.{s}]\nhost = "{addr}"\n' + (f'sae = ["SAE_{s}"]\n' if s in ("A", "B") else "")
            for s, (_, addr) in spaces.items()
        )
        links = "\n".join(
            f'[[links]]\ntransmitter = "{a}"\nreceiver = "{b}"\ndistance_km = 5\nsimulation_testbed = true\n'
            for a, b in itertools.pairwise(SITES)
        )
        topology = tmp_path / "line4-netns.toml"
        topology.write_text(sites + "\n" + links)
        layouts = deploy(topology, tmp_path / "dep", rounds=2)
        assert layouts["A"].etsi_url.startswith(f"https://{spaces['A'][1]}:")
        with running({}) as procs:  # every process added to procs is stopped on the way out
            for site, layout in layouts.items():  # each node inside its own namespace
                procs[site] = start_site(layout, prefix=["ip", "netns", "exec", spaces[site][0]])
            wait_links_up(layouts, procs)
            with etsi_client(layouts["A"], "SAE_A") as a, etsi_client(layouts["B"], "SAE_B") as b:
                answer = enc_keys(a, "SAE_B", 2, extension_optional=[{RELAY_PATH_EXTENSION: True}])
                taken = keys_of(answer)
                path = answer.json()["keys"][0]["key_extension"][RELAY_PATH_EXTENSION]
                assert path == ["A", "R1", "R2", "B"]
                assert keys_of(dec_keys(b, "SAE_A", list(taken))) == taken
