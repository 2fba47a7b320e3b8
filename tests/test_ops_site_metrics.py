"""A multi-link site's metrics: one family per metric, one series per link (labels site and link)."""

from __future__ import annotations

from prometheus_client import generate_latest
from prometheus_client.core import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from qkdstack.ops.metrics import StatusCollector


def _link(link: str, accepted: int, qber: float) -> dict:
    return {"site": "R1", "link": link, "role": "receiver", "rounds_accepted": accepted, "rounds_aborted": 0,
            "secret_bits": 1000 * accepted, "last_round": {"accepted": True, "qber_z": qber, "qber_x": qber}}


def test_every_link_of_a_site_is_its_own_series_of_one_family() -> None:
    doc = {"site": "R1", "rounds_accepted": 5, "links": [_link("A-R1", 2, 0.01), _link("R1-R2", 3, 0.02)],
           "relay": {"forwarded": 7, "relays_failed": 1}}
    registry = CollectorRegistry(auto_describe=False)
    registry.register(StatusCollector(lambda: doc))
    families = {f.name: f for f in text_string_to_metric_families(generate_latest(registry).decode())}
    accepted = {s.labels["link"]: s.value for s in families["qkdstack_rounds_accepted"].samples
                if s.name.endswith("_total")}
    assert accepted == {"A-R1": 2, "R1-R2": 3}
    qber = {(s.labels["link"], s.labels["basis"]): s.value for s in families["qkdstack_qber_ratio"].samples}
    assert qber[("A-R1", "Z")] == 0.01 and qber[("R1-R2", "Z")] == 0.02
    relay = {s.labels["event"]: s.value for s in families["qkdstack_relay"].samples if s.name.endswith("_total")}
    assert relay == {"forwarded": 7, "relays_failed": 1}
