"""A QKD network of node processes: keys relayed through trusted nodes, rerouted around a killed one.

Each site is a ``qkdstack node`` process of a deployment written by ``init --topology``'s writer; the
consumers are plain HTTPS clients with their SAE certificates (ETSI GS QKD 014 over mutual TLS).
"""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from _network_support import (
    EXAMPLES,
    dec_keys,
    deploy,
    enc_keys,
    etsi_client,
    keys_of,
    log_tail,
    running,
    site_status,
    start_site,
    stop_site,
    wait_links_up,
)
from qkdstack.network.site_kme import PATH_EXTENSION as RELAY_PATH_EXTENSION

pytestmark = pytest.mark.slow


def short_links(example: str, tmp_path: Path) -> Path:
    """The example topology with every link 5 km long, so small frames give key at once."""
    text = re.sub(r"distance_km = \d+", "distance_km = 5", (EXAMPLES / example).read_text())
    path = tmp_path / example
    path.write_text(text)
    return path


def relay_path(entry: dict) -> list[str]:
    return list((entry.get("key_extension") or {}).get(RELAY_PATH_EXTENSION) or [])


def test_a_key_crosses_two_trusted_nodes_of_a_line(tmp_path: Path) -> None:
    layouts = deploy(short_links("line4.toml", tmp_path), tmp_path / "dep", rounds=2)
    with running(layouts) as procs:
        wait_links_up(layouts, procs)
        with etsi_client(layouts["A"], "SAE_A") as a, etsi_client(layouts["B"], "SAE_B") as b:
            answer = enc_keys(a, "SAE_B", 3, extension_optional=[{RELAY_PATH_EXTENSION: True}])
            taken = keys_of(answer)
            assert len(taken) == 3
            for entry in answer.json()["keys"]:
                assert relay_path(entry) == ["A", "R1", "R2", "B"], entry.get("key_extension")
            fetched = keys_of(dec_keys(b, "SAE_A", list(taken)))
            assert fetched == taken  # identical, under the same key IDs
            again = dec_keys(b, "SAE_A", list(taken))  # delivered once, then erased
            assert again.status_code == 400, again.text
        deadline = time.monotonic() + 10  # the site rewrites its status.json every second
        while (site_status(layouts["R1"]).get("relay") or {}).get("forwarded", 0) < 1:
            assert time.monotonic() < deadline, site_status(layouts["R1"]).get("relay")
            time.sleep(0.3)


def test_a_ring_reroutes_around_a_killed_relay_and_never_delivers_a_key_twice(tmp_path: Path) -> None:
    layouts = deploy(short_links("ring5.toml", tmp_path), tmp_path / "dep", rounds=2)
    with running(layouts) as procs:
        wait_links_up(layouts, procs)
        delivered: dict[str, bytes] = {}
        fetched: dict[str, bytes] = {}
        paths: list[tuple[float, list[str]]] = []
        failures: list[str] = []
        duplicates: list[str] = []
        lost: list[str] = []
        stop = threading.Event()

        def consumers() -> None:
            with etsi_client(layouts["A"], "SAE_A") as a, etsi_client(layouts["B"], "SAE_B") as b:
                while not stop.is_set():
                    try:
                        answer = enc_keys(a, "SAE_B", 2, extension_optional=[{RELAY_PATH_EXTENSION: True}])
                    except httpx.HTTPError as exc:  # a timeout while the relay dies is an outcome
                        failures.append(f"enc: {type(exc).__name__}")
                        continue
                    if answer.status_code != 200:
                        failures.append(f"enc {answer.status_code}: {answer.json().get('message')}")
                        time.sleep(0.2)
                        continue
                    taken = keys_of(answer)
                    duplicates.extend(k for k in taken if k in delivered)
                    delivered.update(taken)
                    paths.append((time.monotonic(), relay_path(answer.json()["keys"][0])))
                    got = dec_keys(b, "SAE_A", list(taken))  # the master's answer came only once B held them
                    if got.status_code != 200:
                        lost.append(got.text)
                        continue
                    fetched.update(keys_of(got))

        worker = threading.Thread(target=consumers, daemon=True)
        worker.start()
        try:
            # The short way, once its links hold enough key: a link that runs short costs more
            # (routing.py), so the very first keys may take the long way while A-R1 and R1-B fill.
            short = ["A", "R1", "B"]
            deadline = time.monotonic() + 60
            while not any(p == short for _, p in paths) and time.monotonic() < deadline:
                time.sleep(0.2)
            assert any(p == short for _, p in paths), (failures[-5:], paths[-5:])
            stop_site(procs["R1"], signal.SIGKILL)  # mid-relay: the consumers keep asking
            killed_at = time.monotonic()
            deadline = killed_at + 60
            while time.monotonic() < deadline and not any(t > killed_at and p and "R1" not in p for t, p in paths):
                time.sleep(0.3)
            rerouted = [(t - killed_at, p) for t, p in paths if t > killed_at and "R1" not in p]
            assert rerouted, (failures[-5:], paths[-3:])
            assert rerouted[0][1] == ["A", "R3", "R2", "B"]
            procs["R1"] = start_site(layouts["R1"])  # the killed node restarts and rejoins
            wait_links_up(layouts, procs, sites=["R1"], timeout=120)
        finally:
            stop.set()
            worker.join(timeout=60)
        assert not duplicates and not lost, (duplicates, lost)
        assert fetched == {k: v for k, v in delivered.items() if k in fetched}
        assert set(fetched) == set(delivered), "a key reached the master without reaching the slave"
        assert all(link.get("kme_link_up") for link in site_status(layouts["R1"])["links"]), log_tail(layouts["R1"])


def test_a_site_whose_link_cannot_start_exits_2_naming_the_link(tmp_path: Path) -> None:
    layouts = deploy(short_links("line4.toml", tmp_path), tmp_path / "dep")
    (layouts["R1"].config.parent / "links" / "R2" / "link.psk").write_text("not a psk\n")
    done = subprocess.run([sys.executable, "-m", "qkdstack.cli", "node", "--config", str(layouts["R1"].config)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr[-2000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("qkdstack node: error: [[links]] peer R2: [auth] psk_file"), last
    assert "Traceback" not in done.stderr
