"""Prometheus metrics of live nodes, parsed with prometheus_client's own parser, against status.json.

Two nodes run in-process over real loopback sockets (as in test_node.py); their admin listeners are
real HTTP servers on loopback, scraped with urllib. ETSI GS QKD 014 requests go over mutual TLS with
the deployment's SAE certificates. The figures must equal the node's status.json, and no key byte may
appear on any admin path.
"""

from __future__ import annotations

import asyncio
import base64
import json
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from _node_support import deploy, status
from qkdstack.apps.keysource import Etsi014Client
from qkdstack.errors import QKDError
from qkdstack.node.config import load_config
from qkdstack.node.service import Node


def _get(url: str, token: str | None = None) -> tuple[int, bytes, str]:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(request, timeout=10) as answer:
            return answer.status, answer.read(), answer.headers.get("Content-Type", "")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read(), exc.headers.get("Content-Type", "")


def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """/metrics parsed by prometheus_client.parser: {(sample name, sorted labels): value}."""
    code, body, ctype = _get(url)
    assert code == 200 and ctype.startswith("text/plain"), (code, ctype)
    out = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def sample(metrics: dict, name: str, **labels: str) -> float:
    hits = [v for (n, lbl), v in metrics.items() if n == name and all((k, v2) in lbl for k, v2 in labels.items())]
    assert len(hits) == 1, (name, labels, [k for k in metrics if k[0] == name])
    return hits[0]


async def _start(configs: list[Path]) -> tuple[list[Node], list[asyncio.Task]]:
    nodes = [Node(load_config(c)) for c in configs]
    return nodes, [asyncio.create_task(n.run()) for n in nodes]


async def _until(nodes: list[Node], tasks: list[asyncio.Task], cond: Any, timeout: float = 120) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not cond():
        for t in tasks:
            if t.done():
                t.result()
        assert loop.time() < deadline, [n.status_doc for n in nodes]
        await asyncio.sleep(0.1)


async def _stop(nodes: list[Node], tasks: list[asyncio.Task]) -> None:
    for n in nodes:
        n.stop.set()
    results = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 30)
    for r in results:
        if isinstance(r, BaseException):
            raise r


def _check_against_status(metrics: dict, st: dict[str, Any]) -> None:
    site, link = st["site"], st["link"]
    lbl = {"site": site, "link": link}
    assert sample(metrics, "qkdstack_status_updated_timestamp_seconds", **lbl) == st["updated"]
    assert sample(metrics, "qkdstack_rounds_accepted_total", **lbl) == st["rounds_accepted"]
    aborted = sum(v for (n, _), v in metrics.items() if n == "qkdstack_rounds_aborted_total")
    assert aborted == st["rounds_aborted"]
    assert sample(metrics, "qkdstack_secret_key_bits_total", **lbl) == st["secret_bits"]
    for kind in ("wall", "device"):
        assert sample(metrics, "qkdstack_secret_key_rate_bits_per_second", time=kind, **lbl) == \
            st[f"secret_key_rate_bit_per_s_{kind}"]
    if "real_time_factor" in st:
        assert sample(metrics, "qkdstack_real_time_factor", **lbl) == st["real_time_factor"]
    last = st["last_round"]
    assert last["accepted"]
    assert sample(metrics, "qkdstack_qber_ratio", basis="Z", **lbl) == last["qber_z"]
    assert sample(metrics, "qkdstack_qber_ratio", basis="X", **lbl) == last["qber_x"]
    assert sample(metrics, "qkdstack_phase_error_bound_ratio", **lbl) == last["phase_error_bound"]
    assert sample(metrics, "qkdstack_last_round_disclosed_bits", **lbl) == sum(last["leakage_bits"].values())
    assert sample(metrics, "qkdstack_auth_key_consumed_bits_total", **lbl) == st["auth_bits_consumed"]
    assert sample(metrics, "qkdstack_auth_pool_balance_bits", **lbl) == st["auth_pool"]["balance_bits"]
    assert sample(metrics, "qkdstack_key_store_keys", **lbl) == st["store"]["stored_keys"]
    assert sample(metrics, "qkdstack_key_store_capacity_keys", **lbl) == 100_000
    assert sample(metrics, "qkdstack_epsilon", component="link_total", **lbl) == st["epsilon"]["link_total"]
    disclosed = sum(v for (n, _), v in metrics.items() if n == "qkdstack_disclosed_bits_total")
    assert disclosed > 0
    f = sample(metrics, "qkdstack_reconciliation_efficiency", **lbl)
    assert 1.0 < f < 2.0  # Cascade, f ≈ 1.05–1.2 at these block sizes


async def test_metrics_of_a_two_node_run_agree_with_status_json(tmp_path: Path) -> None:
    layouts = deploy(tmp_path / "dep", rounds=2)
    nodes, tasks = await _start([layouts["A"].config, layouts["B"].config])
    try:
        await _until(nodes, tasks, lambda: all(n.status_doc and n.status_doc.get("metrics_url") for n in nodes))
        for n, site in zip(nodes, "AB", strict=True):
            assert n.status_doc["metrics_url"] == f"{layouts[site].admin_url}/metrics"
            assert n.status_doc["dashboard_url"] == f"{layouts[site].admin_url}/"
        # During the run: after the first accepted round, a scrape agrees with status.json on disk.
        await _until(nodes, tasks, lambda: all(n.stats.rounds_accepted >= 1 for n in nodes))
        for site in "AB":
            for _ in range(20):  # a round may end between the two reads: read again until both are the same
                before = status(tmp_path / "dep" / site)
                metrics = await asyncio.to_thread(scrape, f"{layouts[site].admin_url}/metrics")
                after = status(tmp_path / "dep" / site)
                if before == after and after["last_round"].get("accepted"):
                    break
                await asyncio.sleep(0.2)
            _check_against_status(metrics, after)
        await _until(nodes, tasks, lambda: all(n.finished for n in nodes))
        await asyncio.sleep(0.5)

        # ETSI 014 traffic: 3 keys by enc_keys at A, the same by dec_keys at B, one refused request.
        sae_a, sae_b = layouts["A"].sae_ids[0], layouts["B"].sae_ids[0]

        def client(site: str, peer: str) -> Etsi014Client:
            cert, key = layouts[site].sae_cert(layouts[site].sae_ids[0])
            return Etsi014Client(layouts[site].etsi_url, peer, str(cert), str(key), str(layouts[site].ca))

        async with client("A", sae_b) as master, client("B", sae_a) as slave:
            for _ in range(100):
                try:
                    keys = await master.get_new_keys(3, 256)
                    break
                except QKDError:
                    await asyncio.sleep(0.2)
            got = await slave.get_keys_by_id([k.key_id for k in keys])
            assert [k.key for k in got] == [k.key for k in keys]
            with pytest.raises(QKDError):  # an unknown key ID: 400
                await slave.get_keys_by_id(["00000000-0000-4000-8000-000000000000"])
        secrets_ = [k.key for k in keys]

        for site in "AB":
            st = status(tmp_path / "dep" / site)
            metrics = await asyncio.to_thread(scrape, f"{layouts[site].admin_url}/metrics")
            _check_against_status(metrics, st)
            assert sample(metrics, "qkdstack_finished", site=site) == 1
        m_a = await asyncio.to_thread(scrape, f"{layouts['A'].admin_url}/metrics")
        m_b = await asyncio.to_thread(scrape, f"{layouts['B'].admin_url}/metrics")
        assert sample(m_a, "qkdstack_etsi014_keys_delivered_total", endpoint="enc_keys") == 3
        assert sample(m_b, "qkdstack_etsi014_keys_delivered_total", endpoint="dec_keys") == 3
        assert sample(m_b, "qkdstack_etsi014_requests_total", endpoint="dec_keys", code="200") == 1
        assert sample(m_b, "qkdstack_etsi014_requests_total", endpoint="dec_keys", code="400") == 1
        ok_a = sum(v for (n, lbl), v in m_a.items()
                   if n == "qkdstack_etsi014_requests_total" and ("endpoint", "enc_keys") in lbl)
        assert ok_a >= 1
        assert sample(m_b, "qkdstack_etsi014_request_duration_seconds_count", endpoint="dec_keys") == 2
        assert sample(m_b, "qkdstack_etsi014_request_duration_seconds_bucket", endpoint="dec_keys", le="+Inf") == 2

        # No key byte anywhere on the admin listener (metrics, status, rounds, page).
        for site in "AB":
            for path in ("/metrics", "/status.json", "/rounds.json?limit=1000", "/"):
                code, body, _ = await asyncio.to_thread(_get, layouts[site].admin_url + path)
                assert code == 200
                for key in secrets_:
                    for form in (key.hex().encode(), base64.b64encode(key), base64.b64encode(key)[:16]):
                        assert form not in body, (site, path)
            code, body, _ = await asyncio.to_thread(_get, layouts[site].admin_url + "/status.json")
            doc = json.loads(body)["sites"][0]
            assert doc["site"] == site and doc["ops"]["max_qber"] == 0.11
    finally:
        await _stop(nodes, tasks)
    # stopped: the admin listeners are closed
    for site in "AB":
        try:
            code = _get(layouts[site].admin_url + "/metrics")[0]
        except (urllib.error.URLError, ConnectionError):
            code = None
        assert code is None
