"""JSON log lines, the readable text default, the store water-mark watcher and the round history reader."""

from __future__ import annotations

import io
import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest

from _node_support import deploy
from qkdstack.ops.logs import TEXT_FORMAT, JsonFormatter, classify
from qkdstack.ops.metrics import RoundHistory, compact_round
from qkdstack.ops.service import StoreWatch


def _emit(formatter: logging.Formatter, level: int, msg: str, *args: object, **extra: object) -> str:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter)
    logger = logging.getLogger("qkdstack.node.test-ops-logs")
    logger.propagate = False
    logger.handlers = [handler]
    logger.setLevel(logging.DEBUG)
    try:
        logger.log(level, msg, *args, extra=extra or None)
    finally:
        logger.handlers = []
    return stream.getvalue()


def test_json_lines_name_event_site_link_round() -> None:
    fmt = JsonFormatter("A", "A-B")
    block = "3f2a9c1e-0000-4000-8000-000000000000"
    line = _emit(fmt, logging.WARNING, "%s: round %s aborted in %s: %s", "A", block[:8], "estimation",
                 "QBER 25.00% in the test basis exceeds the tolerance 11.00%")
    assert line.count("\n") == 1
    doc = json.loads(line)
    assert doc["event"] == "round.aborted" and doc["round"] == block[:8] and doc["level"] == "warning"
    assert doc["site"] == "A" and doc["link"] == "A-B" and "aborted in estimation" in doc["message"]
    doc = json.loads(_emit(fmt, logging.INFO, "%s: peer %s authenticated (round %d, %d key bits)", "A", "B", 7, 0))
    assert doc["event"] == "peer.authenticated" and doc["round"] == "7"
    doc = json.loads(_emit(fmt, logging.INFO, "something else\non two lines"))
    assert doc["event"] == "node.test-ops-logs.message" and doc["round"] is None
    doc = json.loads(_emit(fmt, logging.INFO, "explicit", event="custom.event", round="r1"))
    assert doc["event"] == "custom.event" and doc["round"] == "r1"
    try:
        raise ValueError("boom")
    except ValueError:
        stream = io.StringIO()
        handler = logging.StreamHandler(stream)
        handler.setFormatter(fmt)
        record = logging.LogRecord("qkdstack.node", logging.ERROR, __file__, 1, "failed", None, sys.exc_info())
        handler.emit(record)
    doc = json.loads(stream.getvalue())
    assert "ValueError: boom" in doc["exception"]


@pytest.mark.parametrize(("message", "event"), [
    ("A: link to B lost or refused (reset); reconnecting", "link.reconnecting"),
    ("A: KME peer link to B up", "kms_link.up"),
    ("A: KME peer link: ChannelError: closed", "kms_link.down"),
    ("A: authentication pool exhausted; stopping the link rather than weakening authentication",
     "auth.pool_exhausted"),
    ("A: block 1a2b3c4d cannot be stored yet (full); kept in pending/", "store.full"),
    ("A: ETSI GS QKD 014 server at https://127.0.0.1:1", "etsi014.listening"),
])
def test_known_messages_get_event_names(message: str, event: str) -> None:
    assert classify(message, "qkdstack.node")[0] == event


def test_text_format_stays_readable() -> None:
    line = _emit(logging.Formatter(TEXT_FORMAT), logging.WARNING, "%s: round %s aborted in %s: %s", "A", "3f2a9c1e",
                 "estimation", "too many errors")
    assert line.rstrip().endswith("WARNING qkdstack.node.test-ops-logs: A: round 3f2a9c1e aborted in estimation: "
                                  "too many errors")
    assert not line.startswith("{")


def test_node_cli_has_the_log_format_flag(tmp_path: Path) -> None:
    layouts = deploy(tmp_path / "dep", rounds=1)
    bad = subprocess.run([sys.executable, "-m", "qkdstack.cli", "node", "--config", str(layouts["A"].config),
                          "--log-format", "xml"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "--log-format" in bad.stderr


def test_store_watch_logs_water_marks_at_their_levels(caplog: pytest.LogCaptureFixture) -> None:
    doc: dict = {"store": {"stored_keys": 0}}
    watch = StoreWatch("A", lambda: doc, {"low_water_keys": 10, "high_water_keys": 90})
    caplog.set_level(logging.INFO, logger="qkdstack.ops")
    seen = []
    for keys in (0, 5, 50, 95, 99, 60, 3):
        doc["store"]["stored_keys"] = keys
        watch.check()
        seen += [(r.levelname, r.event) for r in caplog.records]  # type: ignore[attr-defined]
        caplog.clear()
    assert seen == [("INFO", "store.above_low_water"), ("WARNING", "store.high_water"),
                    ("INFO", "store.below_high_water"), ("WARNING", "store.low_water")]


def test_round_history_counts_new_rounds_and_reads_only_complete_lines(tmp_path: Path) -> None:
    path = tmp_path / "rounds.jsonl"
    old = {"accepted": True, "qber_z": 0.01, "leakage_bits": {"cascade": 100}}
    path.write_text(json.dumps(old) + "\n")
    history = RoundHistory(path, from_end=True)
    aborted = {"accepted": False, "stage": "estimation", "block_id": "b1",
               "reason": "QBER 25.10% in the test basis exceeds the tolerance 11.00%"}
    with open(path, "a") as f:
        f.write(json.dumps(aborted) + "\n" + json.dumps(old)[:10])  # the last line is still being written
    snap = history.snapshot()
    assert snap["accepted"] == 0 and snap["aborted_by_stage"] == {"estimation": 1}
    assert [r["accepted"] for r in history.last(10)] == [True, False]
    assert history.last(10)[-1]["qber_x"] == pytest.approx(0.251)
    with open(path, "a") as f:
        f.write(json.dumps(old)[10:] + "\n")
    snap = history.snapshot()
    assert snap["accepted"] == 1 and snap["disclosed_by_stage"] == {"cascade": 100}
    assert compact_round({"accepted": False, "reason": "phase-error bound 41.96% exceeds"})["phase_error_bound"] == \
        pytest.approx(0.4196)
