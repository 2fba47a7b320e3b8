"""Prometheus metrics of one node: a registry per node, read from what the node already reports.

Nothing is counted twice. The per-link figures come from the node's *status document* (the dict
``Node.write_status`` writes to ``data/status.json`` after every round, obtained through a callback)
and from the node's round history (``data/rounds.jsonl``, followed incrementally by
:class:`RoundHistory`): :class:`StatusCollector` turns both into metric families at each scrape. The
per-site ETSI GS QKD 014 figures (requests by endpoint and status code, latency, keys delivered) come
from :class:`Etsi014Metrics`, an ASGI middleware around the ETSI 014 application.

No metric or label carries key bytes, key IDs or SAE IDs: labels are the site, the link, the basis, the
abort stage, the ETSI endpoint, the HTTP method and status code. The ETSI middleware counts the keys of
a ``200`` key container by counting the ``"key_ID"`` members of the response body, without decoding
it. The full list with units is in docs/operations.md.
"""

from __future__ import annotations

import collections
import json
import math
import re
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

StatusSource = Callable[[], dict[str, Any] | None]
"""Returns the node's current status document (``status.json``'s dict), or None before the first one."""

_QBER_IN_REASON = re.compile(r"QBER ([0-9.]+)% in the test basis")
_PHASE_IN_REASON = re.compile(r"phase-error bound ([0-9.]+)%")


def _h2(p: float) -> float:
    """Binary entropy in bits."""
    if p <= 0 or p >= 1:
        return 0.0
    return -p * math.log2(p) - (1 - p) * math.log2(1 - p)


def reconciliation_efficiency(doc: dict[str, Any]) -> tuple[str, float] | None:
    """(method, f) of an accepted round from its ``rounds.jsonl`` record, or None.

    LDPC reports its own ``ldpc_efficiency`` (everything its stage disclosed, over n·h(Q)). For
    Cascade, f is Alice's disclosed parities over n·h(Q) with n the sifted key length and Q the key
    basis QBER (Martinez-Mateo et al., QIC 15 (2015), the usual definition; the parities Bob sends back
    are counted as leakage by the node but are not in this figure).
    """
    proof = doc.get("proof") or {}
    stats = proof.get("stats") or {}
    if isinstance(stats.get("ldpc_efficiency"), int | float):
        return "ldpc", float(stats["ldpc_efficiency"])
    stages = (proof.get("leakage_accounting") or {}).get("stages") or {}
    cascade = stages.get("cascade") or {}
    counts = (proof.get("counts") or {}).get("key_counts")
    qber = doc.get("qber_z")
    if "alice_to_bob" in cascade and counts and isinstance(qber, int | float):
        denom = sum(counts) * _h2(qber)
        if denom > 0:
            return "cascade", cascade["alice_to_bob"] / denom
    return None


def compact_round(doc: dict[str, Any]) -> dict[str, Any]:
    """A round's record for the dashboard and the metrics: its figures, none of its proof (no key bytes anyway).

    An aborted round's QBER or phase-error bound, when its reason states it (the estimation stage's
    "QBER 25.10% in the test basis exceeds ..."), is given as ``qber_x`` / ``phase_error_bound`` so that
    an eavesdropper's rounds show on the QBER chart, not only as alarms.
    """
    leak = doc.get("leakage_bits")
    out: dict[str, Any] = {
        "time": doc.get("time"),
        "block_id": doc.get("block_id"),
        "accepted": bool(doc.get("accepted")),
        "qber_z": doc.get("qber_z"),
        "qber_x": doc.get("qber_x"),
        "phase_error_bound": doc.get("phase_error_bound"),
        "key_bits": doc.get("key_bits"),
        "disclosed_bits": sum(leak.values()) if isinstance(leak, dict) else leak,
        "stage": doc.get("stage"),
        "reason": doc.get("reason"),
    }
    if not out["accepted"] and isinstance(out["reason"], str):
        if m := _QBER_IN_REASON.search(out["reason"]):
            out["qber_x"] = float(m.group(1)) / 100
        if m := _PHASE_IN_REASON.search(out["reason"]):
            out["phase_error_bound"] = float(m.group(1)) / 100
    eff = reconciliation_efficiency(doc) if out["accepted"] else None
    if eff is not None:
        out["reconciliation"], out["efficiency"] = eff
    return out


class RoundHistory:
    """Follows a node's ``rounds.jsonl``: totals since a starting point and the last rounds, thread-safe.

    ``from_end=True`` (the node's own admin listener) counts only rounds appended after it was made, so
    its totals agree with the status document's, which also start at zero when the node starts; the
    recent rounds (for the dashboard's chart) are read from the whole file either way. A line is taken
    only once complete (ends in a newline); a file that shrank (replaced) is read again from its start.
    """

    RECORD_BYTES = 8192
    """Generous size of one round's record (about 2-3 kB with its proof)."""

    def __init__(self, path: Path, *, keep: int = 500, from_end: bool = False) -> None:
        self.path = Path(path)
        self.keep = keep
        self._lock = threading.Lock()
        self._offset = 0
        self._count_from = 0
        self.accepted = 0
        self.aborted_by_stage: collections.Counter[str] = collections.Counter()
        self.disclosed_by_stage: collections.Counter[str] = collections.Counter()
        self.efficiency: tuple[str, float] | None = None
        self.recent: collections.deque[dict[str, Any]] = collections.deque(maxlen=keep)
        try:
            size = self.path.stat().st_size
        except FileNotFoundError:
            size = 0
        if from_end:
            self._count_from = size
        # The recent rounds need only the file's tail (a node's history grows for months): start about
        # ``keep`` records before the end, at a line start.
        self._offset = max(0, size - keep * self.RECORD_BYTES)
        self._skip_partial = self._offset > 0

    def update(self) -> None:
        with self._lock:
            try:
                size = self.path.stat().st_size
            except FileNotFoundError:
                return
            if size < self._offset:  # replaced or truncated: start again
                self._offset = self._count_from = 0
                self._skip_partial = False
                self.recent.clear()
            if size == self._offset:
                return
            with open(self.path, "rb") as f:
                f.seek(self._offset)
                data = f.read(size - self._offset)
            if self._skip_partial:  # started mid-file: drop the partial first line
                first = data.find(b"\n")
                if first < 0:
                    return
                self._offset += first + 1
                data = data[first + 1:]
                self._skip_partial = False
            end = data.rfind(b"\n")
            if end < 0:
                return
            pos = self._offset
            for line in data[: end + 1].splitlines(keepends=True):
                start, pos = pos, pos + len(line)
                try:
                    doc = json.loads(line)
                except ValueError:
                    continue
                if not isinstance(doc, dict):
                    continue
                self.recent.append(compact_round(doc))
                if start >= self._count_from:
                    self._count(doc)
            self._offset += end + 1

    def _count(self, doc: dict[str, Any]) -> None:
        if doc.get("accepted"):
            self.accepted += 1
            leak = doc.get("leakage_bits")
            if isinstance(leak, dict):
                for stage, bits in leak.items():
                    self.disclosed_by_stage[str(stage)] += int(bits)
            self.efficiency = reconciliation_efficiency(doc) or self.efficiency
        else:
            self.aborted_by_stage[str(doc.get("stage") or "unknown")] += 1

    def last(self, limit: int) -> list[dict[str, Any]]:
        self.update()
        with self._lock:
            return list(self.recent)[-limit:] if limit > 0 else []

    def snapshot(self) -> dict[str, Any]:
        self.update()
        with self._lock:
            return {
                "accepted": self.accepted,
                "aborted_by_stage": dict(self.aborted_by_stage),
                "disclosed_by_stage": dict(self.disclosed_by_stage),
                "efficiency": self.efficiency,
                "last": self.recent[-1] if self.recent else None,
                "last_accepted": next((r for r in reversed(self.recent) if r["accepted"]), None),
            }


def _num(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


class StatusCollector(Collector):
    """Metric families from the status document and the round history, built at each scrape."""

    def __init__(self, status: StatusSource, history: RoundHistory | None = None,
                 extras: dict[str, Any] | None = None, link_histories: dict[str, RoundHistory] | None = None) -> None:
        self.status = status
        self.history = history
        self.link_histories = link_histories or {}
        """A multi-link site's round history per link (by the status documents' ``link``)."""
        self.extras = extras or {}
        """Configured figures the status document does not carry: ``capacity_keys``, ``max_qber``, ..."""

    def describe(self) -> Iterator[Metric]:
        return iter(())  # built from the status at each scrape; nothing to check at registration

    def collect(self) -> Iterator[Metric]:
        """One family per metric; a multi-link site's status (``links``) gives one series per link in each."""
        doc = self.status()
        if not doc:
            return
        if "links" not in doc:
            yield from self._families(doc, self.history)
            return
        merged: dict[str, Metric] = {}
        for link_doc in doc["links"]:
            history = self.link_histories.get(str(link_doc.get("link", "")))
            for family in self._families(link_doc, history):
                if family.name in merged:
                    merged[family.name].samples.extend(family.samples)
                else:
                    merged[family.name] = family
        yield from merged.values()
        relay = doc.get("relay") or {}
        if relay:
            family = CounterMetricFamily("qkdstack_relay", "Trusted-node key relay at this site since it started, "
                                         "by event: relays_started, relays_delivered, relays_failed (as source), "
                                         "forwarded (as a trusted node), received (as destination), auth_failures "
                                         "(hop messages whose tag failed), voided.", labels=["site", "event"])
            for event, n in sorted(relay.items()):
                if _num(n) is not None:
                    family.add_metric([str(doc.get("site", "")), event], float(n))
            yield family

    def _families(self, doc: dict[str, Any], history: RoundHistory | None) -> Iterator[Metric]:
        """The metric families of one link's status document and its round history."""
        site, link = str(doc.get("site", "")), str(doc.get("link", ""))
        lbl = ["site", "link"]
        base = [site, link]

        def gauge(name: str, doc_: str, value: Any, unit: str = "") -> Iterator[Metric]:
            v = _num(value)
            if v is not None:
                g = GaugeMetricFamily(name, doc_, labels=lbl, unit=unit)
                g.add_metric(base, v)
                yield g

        def counter(name: str, doc_: str, value: Any, unit: str = "") -> Iterator[Metric]:
            v = _num(value)
            if v is not None:
                c = CounterMetricFamily(name, doc_, labels=lbl, unit=unit)
                c.add_metric(base, v)
                yield c

        device = doc.get("device") or {}
        info = GaugeMetricFamily("qkdstack_node_info", "The node: site, link, role and device labels (value 1).",
                                 labels=[*lbl, "role", "simulated", "seeded"])
        info.add_metric([*base, str(doc.get("role", "")), str(bool(device.get("simulated"))).lower(),
                         str(bool(device.get("seeded"))).lower()], 1)
        yield info
        yield from gauge("qkdstack_status_updated_timestamp_seconds", "When the node last wrote its status "
                         "(Unix time).", doc.get("updated"))
        yield from gauge("qkdstack_finished", "1 once the configured rounds are done (the node only serves keys).",
                         1 if doc.get("finished") else 0)
        yield from counter("qkdstack_rounds_accepted", "Rounds accepted since the node started.",
                           doc.get("rounds_accepted"))
        yield from counter("qkdstack_secret_key", "Secret key distilled since the node started.",
                           doc.get("secret_bits"), "bits")
        yield from counter("qkdstack_stored_key", "Key stored in the key store since the node started.",
                           doc.get("stored_bits"), "bits")
        rates = GaugeMetricFamily("qkdstack_secret_key_rate_bits_per_second",
                                  "Secret key rate since the node started, per second of wall time or of device "
                                  "time (pulses / repetition rate).", labels=[*lbl, "time"])
        for kind in ("wall", "device"):
            v = _num(doc.get(f"secret_key_rate_bit_per_s_{kind}"))
            if v is not None:
                rates.add_metric([*base, kind], v)
        yield rates
        yield from gauge("qkdstack_real_time_factor", "Device seconds distilled per second of wall time over the "
                         "window (1: the node keeps up with its device).", doc.get("real_time_factor"))
        yield from counter("qkdstack_device_distilled_seconds", "Device time distilled into key since the node "
                           "started.", doc.get("device_seconds_distilled"), "seconds")
        yield from counter("qkdstack_reconnections", "Sessions with the peer that ended (lost, refused, "
                           "malformed) and were restarted.", doc.get("reconnections"))

        # The last round's figures: an accepted one from the status, else the history's last accepted one.
        last = doc.get("last_round") or {}
        hist = history.snapshot() if history is not None else None
        accepted_last = last if last.get("accepted") else (hist or {}).get("last_accepted") or {}
        qber = GaugeMetricFamily("qkdstack_qber", "QBER of the last accepted round: Z is the key basis "
                                 "(corrected errors), X the test basis (disclosed sample).", labels=[*lbl, "basis"],
                                 unit="ratio")
        for basis, key in (("Z", "qber_z"), ("X", "qber_x")):
            v = _num(accepted_last.get(key))
            if v is not None:
                qber.add_metric([*base, basis], v)
        yield qber
        yield from gauge("qkdstack_phase_error_bound_ratio", "Upper bound on the phase-error rate of the last "
                         "accepted round (Lim et al. 2014, Eq. 5).", accepted_last.get("phase_error_bound"))
        leak = accepted_last.get("leakage_bits")
        if isinstance(leak, dict):
            leak = sum(leak.values())
        yield from gauge("qkdstack_last_round_disclosed_bits", "Bits disclosed by the last accepted round "
                         "(reconciliation and verification, both directions).", leak)
        yield from gauge("qkdstack_last_round_key_bits", "Secret key of the last accepted round.",
                         accepted_last.get("key_bits"), )
        for key, value in self.extras.items():
            if key in ("max_qber", "max_phase_error"):
                yield from gauge(f"qkdstack_{key}_ratio", f"Configured abort threshold [protocol] {key}.", value)

        aborted = CounterMetricFamily("qkdstack_rounds_aborted", "Rounds aborted since the node started, by the "
                                      "stage that aborted them.", labels=[*lbl, "stage"])
        if hist is not None:
            for stage, n in sorted(hist["aborted_by_stage"].items()):
                aborted.add_metric([*base, stage], n)
            disclosed = CounterMetricFamily("qkdstack_disclosed", "Bits disclosed on the classical channel by "
                                            "accepted rounds since the node started, by stage.",
                                            labels=[*lbl, "stage"], unit="bits")
            for stage, n in sorted(hist["disclosed_by_stage"].items()):
                disclosed.add_metric([*base, stage], n)
            yield disclosed
            if hist["efficiency"] is not None:
                method, f = hist["efficiency"]
                eff = GaugeMetricFamily("qkdstack_reconciliation_efficiency", "Reconciliation efficiency f of the "
                                        "last accepted round (disclosed / n·h(QBER); 1 is the Shannon limit).",
                                        labels=[*lbl, "method"])
                eff.add_metric([*base, method], f)
                yield eff
        elif _num(doc.get("rounds_aborted")) is not None:
            aborted.add_metric([*base, "all"], float(doc["rounds_aborted"]))
        yield aborted

        yield from counter("qkdstack_auth_key_consumed", "Authentication key consumed (one-time pads and hash "
                           "keys) since the node started.", doc.get("auth_bits_consumed"), "bits")
        pool = doc.get("auth_pool") or {}
        yield from gauge("qkdstack_auth_pool_balance_bits", "Authentication key left in the pool (both "
                         "directions).", pool.get("balance_bits"))
        yield from counter("qkdstack_auth_pool_consumed", "Authentication key the pool has consumed over its "
                           "life (persisted across restarts).", pool.get("consumed_bits"), "bits")
        yield from counter("qkdstack_auth_pool_refilled", "Authentication key refilled from QKD key over the "
                           "pool's life.", pool.get("refilled_bits"), "bits")
        yield from gauge("qkdstack_auth_rounds_affordable", "Rounds the pool can still authenticate without a "
                         "refill.", pool.get("rounds_affordable"))
        yield from counter("qkdstack_auth_verification_failures", "Tags that failed to verify.",
                           pool.get("verification_failures"))
        eps = doc.get("epsilon") or {}
        if eps:
            e = GaugeMetricFamily("qkdstack_epsilon", "Running error total of the link: key blocks, "
                                  "authentication, and their sum.", labels=[*lbl, "component"])
            for comp, value in eps.items():
                if _num(value) is not None:
                    e.add_metric([*base, comp], float(value))
            yield e
        store = doc.get("store") or {}
        yield from gauge("qkdstack_key_store_keys", "Keys in the key store for this link (chunks of "
                         "key_size_bits).", store.get("stored_keys"))
        yield from gauge("qkdstack_key_store_key_size_bits", "Size of one stored key.", store.get("key_size_bits"))
        for key in ("capacity_keys", "high_water_keys", "low_water_keys"):
            yield from gauge(f"qkdstack_key_store_{key}", f"Configured [kms] {key}.", self.extras.get(key))


_ENDPOINT = re.compile(r"/api/v1/keys/[^/]+/(status|enc_keys|dec_keys)")
_KEY_ID = b'"key_ID"'


class Etsi014Metrics:
    """ETSI GS QKD 014 request metrics of a site, registered in the node's registry.

    :meth:`middleware` wraps the ETSI 014 ASGI application: every HTTP request is counted by endpoint
    (``status``, ``enc_keys``, ``dec_keys`` or ``other``), method and status code, timed from its arrival to
    the end of its answer, and the keys of every ``200`` key container are counted.
    """

    BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)

    def __init__(self, registry: CollectorRegistry, site: str) -> None:
        self.site = site
        self.requests = Counter("qkdstack_etsi014_requests", "ETSI 014 requests answered, by endpoint, method "
                                "and HTTP status code.", ["site", "endpoint", "method", "code"], registry=registry)
        self.latency = Histogram("qkdstack_etsi014_request_duration_seconds", "ETSI 014 request latency, from the "
                                 "request's arrival at the application to the end of its answer.",
                                 ["site", "endpoint"], buckets=self.BUCKETS, registry=registry)
        self.keys = Counter("qkdstack_etsi014_keys_delivered", "Keys handed out in 200 key containers, by endpoint "
                            "(enc_keys: to masters, dec_keys: to slaves).", ["site", "endpoint"], registry=registry)

    def middleware(self, app: Any) -> Any:
        """The ASGI application ``app`` with these metrics recorded around each HTTP request."""

        async def metered(scope: dict, receive: Any, send: Any) -> None:
            if scope.get("type") != "http":
                return await app(scope, receive, send)
            m = _ENDPOINT.fullmatch(scope.get("path", ""))
            endpoint = m.group(1) if m else "other"
            method = scope.get("method", "")
            method = method if method in ("GET", "POST") else "other"
            start = time.perf_counter()
            state = {"code": 0, "keys": 0, "tail": b""}

            async def sending(message: dict) -> None:
                if message["type"] == "http.response.start":
                    state["code"] = message["status"]
                elif message["type"] == "http.response.body" and state["code"] == 200 and m \
                        and endpoint != "status":
                    chunk = state["tail"] + message.get("body", b"")
                    state["keys"] += chunk.count(_KEY_ID)
                    state["tail"] = chunk[-(len(_KEY_ID) - 1):]
                await send(message)

            try:
                await app(scope, receive, sending)
            finally:
                code = str(state["code"] or 500)
                self.requests.labels(self.site, endpoint, method, code).inc()
                self.latency.labels(self.site, endpoint).observe(time.perf_counter() - start)
                if state["keys"]:
                    self.keys.labels(self.site, endpoint).inc(state["keys"])

        return metered


class SkipMetrics:
    """SKIP key-provider metrics (kms/skip.py): requests by endpoint and status code, latency, keys delivered.

    The SKIP server calls :meth:`observe` once per answered request (from its connection threads;
    prometheus_client's metrics are thread-safe). No label holds a key, key ID or system ID.
    """

    ENDPOINTS = frozenset({"capabilities", "entropy", "key"})

    def __init__(self, registry: CollectorRegistry, site: str) -> None:
        self.site = site
        self.requests = Counter("qkdstack_skip_requests", "SKIP requests answered, by endpoint (capabilities, key, "
                                "key_by_id, entropy, other) and HTTP status code.", ["site", "endpoint", "code"],
                                registry=registry)
        self.latency = Histogram("qkdstack_skip_request_duration_seconds", "SKIP request latency, from the parsed "
                                 "request to the answer.", ["site", "endpoint"],
                                 buckets=Etsi014Metrics.BUCKETS, registry=registry)
        self.keys = Counter("qkdstack_skip_keys_delivered", "Keys handed out by SKIP (key: new keys, key_by_id: the "
                            "peer's keys by ID).", ["site", "endpoint"], registry=registry)

    @classmethod
    def endpoint(cls, path: str) -> str:
        parts = [p for p in path.split("/") if p]
        if len(parts) == 1:
            return parts[0] if parts[0] in cls.ENDPOINTS else "other"
        return "key_by_id" if len(parts) == 2 and parts[0] == "key" else "other"

    def observe(self, path: str, code: int, seconds: float) -> None:
        endpoint = self.endpoint(path)
        self.requests.labels(self.site, endpoint, str(code)).inc()
        self.latency.labels(self.site, endpoint).observe(seconds)
        if code == 200 and endpoint in ("key", "key_by_id"):
            self.keys.labels(self.site, endpoint).inc()


class NodeMetrics:
    """The Prometheus registry of one node: its status collector and its ETSI 014 metrics."""

    def __init__(self, status: StatusSource, *, site: str, rounds_path: Path | None = None,
                 extras: dict[str, Any] | None = None, link_rounds: dict[str, Path] | None = None) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.history = RoundHistory(rounds_path, from_end=True) if rounds_path is not None else None
        links = {link: RoundHistory(path, from_end=True) for link, path in (link_rounds or {}).items()}
        self.collector = StatusCollector(status, self.history, extras, links)
        self.registry.register(self.collector)
        self.etsi014 = Etsi014Metrics(self.registry, site)
        self.skip = SkipMetrics(self.registry, site)

    def exposition(self) -> bytes:
        """The registry in the Prometheus text format (prometheus_client's own writer)."""
        from prometheus_client import generate_latest

        return generate_latest(self.registry)
