"""Log output of ``qkdstack node``: readable text by default, one JSON object per line with ``--log-format json``.

Each JSON line has ``time`` (UTC, ISO 8601), ``level``, ``logger``, ``event`` (a stable dotted name such
as ``round.aborted``), ``site``, ``link``, ``round`` (the round's block ID, or its short form, when the
line is about a round; else null), ``message`` (the same sentence as the text format) and, for an
error with a traceback, ``exception``. A log call may give ``extra={"event": ..., "round": ...}``; the
node's existing messages are named by :data:`EVENTS` (patterns of their text), anything else gets
``<logger>.message``. Site and link are the node's own (one node per process); a line about the peer
names it in its message.

Log lines never carry key bytes: the node's messages give block IDs, counts and reasons only.
"""

from __future__ import annotations

import datetime
import json
import logging
import re
from typing import Any

EVENTS: list[tuple[re.Pattern[str], str]] = [
    (re.compile(r"round (?P<round>[0-9a-f-]+) aborted in (?P<stage>\w+)"), "round.aborted"),
    (re.compile(r"authenticated \(round (?P<round>\d+)"), "peer.authenticated"),
    (re.compile(r"round (?P<round>\d+) was never accepted"), "round.dropped"),
    (re.compile(r"pending round (?P<round>\d+)"), "round.dropped"),
    (re.compile(r"block (?P<round>[0-9a-f]+) cannot be stored yet"), "store.full"),
    (re.compile(r"stopping the link rather than weakening authentication"), "auth.pool_exhausted"),
    (re.compile(r"bootstrap by .* succeeded.*round (?P<round>\S+)"), "auth.bootstrap"),
    (re.compile(r"not completed the bootstrap"), "auth.bootstrap_again"),
    (re.compile(r"authentication pool seeded"), "auth.seeded"),
    (re.compile(r"session with .* failed"), "link.session_failed"),
    (re.compile(r"link to .* lost or refused"), "link.reconnecting"),
    (re.compile(r"KME peer link to .* up"), "kms_link.up"),
    (re.compile(r"KME peer link"), "kms_link.down"),
    (re.compile(r"peer KME request failed"), "kms_link.request_failed"),
    (re.compile(r"rounds accepted, \d+ aborted; secret key rate"), "node.key_rate"),
    (re.compile(r"ETSI GS QKD 014 server at"), "etsi014.listening"),
    (re.compile(r"admin listener at"), "admin.listening"),
    (re.compile(r"key store .* high-water mark"), "store.high_water"),
    (re.compile(r"key store .* low-water mark"), "store.low_water"),
    (re.compile(r"simulated device|seeded simulation|recorded device"), "node.key_caveat"),
]
"""(pattern of the message, event name) for the node's messages, first match wins."""

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def classify(message: str, logger: str) -> tuple[str, str | None]:
    """(event name, round or None) of a message without explicit ``extra``."""
    for pattern, event in EVENTS:
        m = pattern.search(message)
        if m:
            return event, m.groupdict().get("round")
    short = logger.removeprefix("qkdstack.") or "root"
    return f"{short}.message", None


class JsonFormatter(logging.Formatter):
    """One JSON object per record (see the module docstring); ``site`` and ``link`` are this node's."""

    def __init__(self, site: str | None = None, link: str | None = None) -> None:
        super().__init__()
        self.site = site
        self.link = link

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        event, round_id = classify(message, record.name)
        event = getattr(record, "event", None) or event
        round_id = getattr(record, "round", None) or round_id
        doc: dict[str, Any] = {
            "time": datetime.datetime.fromtimestamp(record.created, datetime.UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": event,
            "site": getattr(record, "site", None) or self.site,
            "link": getattr(record, "link", None) or self.link,
            "round": round_id,
            "message": message,
        }
        if record.exc_info:
            doc["exception"] = self.formatException(record.exc_info)
        return json.dumps(doc, ensure_ascii=False, default=str)


def configure(level: str = "info", fmt: str = "text", *, site: str | None = None, link: str | None = None) -> None:
    """Set up the root logger for ``qkdstack node``: ``fmt`` is ``text`` (default) or ``json``."""
    handler = logging.StreamHandler()
    if fmt == "json":
        handler.setFormatter(JsonFormatter(site, link))
    else:
        handler.setFormatter(logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
