"""``qkdstack status --config FILE``: a site's state in a few lines, from the status.json its node writes."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from qkdstack.cli import main
from qkdstack.commands.status import render
from qkdstack.node.deployment import write_deployment

LINK = {"site": "A", "role": "transmitter", "link": "A-B", "updated": 0.0, "rounds_accepted": 3, "rounds_aborted": 1,
        "secret_bits": 30000, "secret_key_rate_bit_per_s_wall": 1.5e5, "secret_key_rate_bit_per_s_device": 3e5,
        "real_time_factor": 0.5, "store": {"stored_keys": 96}, "auth_pool": {"balance_bits": 9216},
        "last_round": {"accepted": True, "qber_z": 0.0102, "qber_x": 0.011, "key_bits": 10000},
        "recent_aborts": ["estimation: QBER 12 % exceeds 11 %"], "etsi014_url": "https://127.0.0.1:7110"}


def test_a_two_site_status_names_rounds_rates_store_pool_and_aborts() -> None:
    text = render({**LINK, "updated": 100.0}, now=103.0)
    assert text.splitlines()[0] == "site A (transmitter of link A-B); status written 3 s ago"
    for part in ("3 accepted, 1 aborted", "QBER 1.02 % (key basis)", "96 keys", "pool 9216 bits",
                 "real-time factor 0.500", "recent abort    estimation: QBER 12 %", "ETSI 014        https://"):
        assert part in text, text


def test_a_network_site_lists_its_links_and_relays_and_an_old_status_says_so() -> None:
    doc = {"site": "R1", "updated": 0.0, "rounds_accepted": 5, "links": [
        {**LINK, "site": "R1", "peer": "A", "role": "receiver", "kme_link_up": True},
        {**LINK, "site": "R1", "peer": "R2", "kme_link_up": False, "last_round": {"stage": "link", "reason": "lost"}},
    ], "relay": {"forwarded": 7, "relays_failed": 0}}
    text = render(doc, now=1000.0)
    assert "(is the node running?)" in text.splitlines()[0]
    assert "link to A (receiver, KME link up)" in text and "link to R2 (transmitter, KME link down)" in text
    assert "ABORTED in link: lost" in text and "forwarded 7" in text


def test_the_command_reads_the_site_of_the_configuration(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    layouts = write_deployment(tmp_path / "dep", ["A", "B"], base_port=41000)
    config = layouts["A"].config
    assert main(["status", "--config", str(config)]) == 2  # never ran: one sentence, exit 2
    assert "has not run" in capsys.readouterr().err
    (config.parent / "data").mkdir(exist_ok=True)
    (config.parent / "data" / "status.json").write_text(json.dumps({**LINK, "updated": time.time()}))
    assert main(["status", "--config", str(config)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("site A (transmitter of link A-B)") and "is the node running" not in out
