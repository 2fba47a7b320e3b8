"""Link state and shortest-path routing for the key relay (docs/network.md, "Routing").

Every site reports, for each of its links, whether the link is up (its KME has the peer attached and
the neighbour's KME-to-KME listener answers) and how much key it can *send* on it (the chunks
available in its own pool of that link: the pool its ``enc_keys`` draw from). Reports are exchanged
between neighbours by periodic pulls (``GET /kmapi/v1/qkdstack/link_state``): each site answers with
its own report and the newest report it holds from every other site, so a report floods the network
in at most diameter rounds. A report carries its origin's sequence number (nanoseconds of the
origin's clock when made); a newer one replaces an older one, and a report not renewed within
``max_age_s`` (by the local clock of the receiver) is forgotten.

The cost of sending over a link in direction X -> Y is ``1 + needed / available`` (one per hop, plus a
penalty that grows as the link runs short), and a direction is unusable when it is reported down or
holds fewer chunks than the relay needs. A direction nobody has reported on yet counts as up with
unknown key (cost 1.5): the relay will find out, and the failure names the hop. Dijkstra's algorithm
(Dijkstra 1959) over these costs gives the path; ties go to the lexicographically smaller path so all
sites agree.
"""

from __future__ import annotations

import heapq
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

UNKNOWN_COST = 1.5
"""The cost of a link direction with no report (up, key unknown)."""


@dataclass(frozen=True)
class DirectionState:
    """What ``sender`` reports about sending to ``receiver``: up or not, chunks available to send."""

    sender: str
    receiver: str
    up: bool
    available: int


@dataclass
class SiteReport:
    """One site's report: the state of each of its links, with the origin's sequence number."""

    site: str
    seq: int
    links: dict[str, tuple[bool, int]]
    """peer site -> (up, chunks available to send to it)."""
    received: float = field(default_factory=time.monotonic)

    def to_wire(self) -> dict[str, Any]:
        return {"site": self.site, "seq": self.seq,
                "links": [{"peer": p, "up": up, "available": n} for p, (up, n) in sorted(self.links.items())]}

    @classmethod
    def from_wire(cls, obj: Any) -> SiteReport | None:
        """Parse a report; None when malformed (reports from the network are never trusted blindly)."""
        try:
            links = {}
            for entry in obj["links"]:
                peer, up, n = entry["peer"], entry["up"], entry["available"]
                if not isinstance(peer, str) or not isinstance(up, bool) or type(n) is not int:
                    return None
                links[peer] = (up, max(0, n))
            site, seq = obj["site"], obj["seq"]
            if not isinstance(site, str) or isinstance(seq, bool) or not isinstance(seq, int):
                return None
            return cls(site, seq, links)
        except (KeyError, TypeError):
            return None


class LinkStateTable:
    """The newest report of every site, as known here."""

    def __init__(self, max_age_s: float = 10.0) -> None:
        self.max_age_s = max_age_s
        self.reports: dict[str, SiteReport] = {}

    def merge(self, report: SiteReport) -> bool:
        """Keep ``report`` if it is newer than what is held for its site; returns whether it was kept."""
        held = self.reports.get(report.site)
        if held is not None and held.seq >= report.seq:
            return False
        report.received = time.monotonic()
        self.reports[report.site] = report
        return True

    def fresh(self) -> list[SiteReport]:
        now = time.monotonic()
        return [r for r in self.reports.values() if now - r.received <= self.max_age_s]

    def directions(self) -> dict[tuple[str, str], DirectionState]:
        out = {}
        for r in self.fresh():
            for peer, (up, n) in r.links.items():
                out[(r.site, peer)] = DirectionState(r.site, peer, up, n)
        return out


def link_cost(state: DirectionState | None, needed: int, reverse: DirectionState | None = None) -> float | None:
    """The cost of sending ``needed`` chunks over a direction; None when it cannot be used.

    ``reverse`` is the receiver's report of the same link: a link its far end reports down is down.
    """
    if reverse is not None and not reverse.up:
        return None
    if state is None:
        return UNKNOWN_COST
    if not state.up or state.available < needed:
        return None
    return 1.0 + needed / max(state.available, 1)


def shortest_path(
    sites: Iterable[str],
    edges: Iterable[tuple[str, str]],
    source: str,
    destination: str,
    states: Mapping[tuple[str, str], DirectionState],
    needed: int,
    excluded: Iterable[frozenset[str]] = (),
) -> list[str] | None:
    """The cheapest path ``source -> destination`` (list of sites), or None when there is none.

    ``edges``: the links (both directions usable); ``states``: the known direction states;
    ``needed``: chunks a relay takes from each hop; ``excluded``: links (as frozensets of their ends)
    to leave out (e.g. one that just failed).
    """
    banned = set(excluded)
    adj: dict[str, list[str]] = {s: [] for s in sites}
    for a, b in edges:
        if frozenset((a, b)) in banned:
            continue
        adj.setdefault(a, []).append(b)
        adj.setdefault(b, []).append(a)
    best: dict[str, tuple[float, list[str]]] = {source: (0.0, [source])}
    heap: list[tuple[float, list[str]]] = [(0.0, [source])]
    done: set[str] = set()
    while heap:
        cost, path = heapq.heappop(heap)
        node = path[-1]
        if node in done:
            continue
        done.add(node)
        if node == destination:
            return path
        for nxt in sorted(adj.get(node, ())):
            if nxt in done:
                continue
            c = link_cost(states.get((node, nxt)), needed, states.get((nxt, node)))
            if c is None:
                continue
            cand = (cost + c, [*path, nxt])
            held = best.get(nxt)
            if held is None or cand < held:
                best[nxt] = cand
                heapq.heappush(heap, cand)
    return None
