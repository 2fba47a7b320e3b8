"""The KME of one site of a network: one link KME per neighbour, plus trusted-node key relay.

:class:`SiteKME` is what the ETSI 014 server (``serve_etsi014``), SKIP and in-unit delivery serve at a
site of a network, instead of a single link's :class:`~qkdstack.kms.kme.KME` (same calls, same
:class:`~qkdstack.kms.kme.KMEError` semantics):

* slave SAE(s) all at one neighbour site: that link's ``KME.enc_keys`` (nothing changes);
* otherwise the key is **relayed** hop by hop (docs/network.md, "Key relay"): the end-to-end key is
  fresh QKD key of the first hop (or, for a second destination of a multicast, the same key sent
  one-time-padded), and every hop carries it under a one-time pad and a one-time Poly1305 tag taken
  from that hop's link key (:mod:`qkdstack.network.relay`), through the link KMEs with the reserved
  :data:`~qkdstack.network.relay.RELAY_SAE` at both ends, so no link key is ever used twice. The
  destination stores the key in its relay store (:mod:`qkdstack.network.relay_store`) and answers; only
  then does the source answer its master SAE. A relay that fails is voided at the destination(s)
  (best effort) and the master gets 503 with the reason.
* ``dec_keys`` looks in the relay store first, then in the link KME of the master's site.
* routing: :mod:`qkdstack.network.routing`, with link state pulled from the neighbours.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import contextlib
import itertools
import logging
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from qkdstack.errors import ChannelError, ConfigError, KeyStoreError, QKDError
from qkdstack.kms.kme import KME, MSG_NOT_FOUND, KMEError, check_key_request, status_document
from qkdstack.kms.store import KeyNotAuthorized, KeyNotFound, chunks_per_key
from qkdstack.network.kme_api import EXT_KEYS, LINK_STATE, VOID, KMEClient
from qkdstack.network.relay import (
    MAC_KEY_BITS,
    RELAY_SAE,
    RelayAuthError,
    RelayError,
    build_hop_message,
    parse_hop_message,
)
from qkdstack.network.relay_store import RelayedKey, RelayStore
from qkdstack.network.routing import LinkStateTable, SiteReport, shortest_path
from qkdstack.network.topology import Topology

log = logging.getLogger(__name__)

PATH_EXTENSION = "qkdstack_relay_path"
"""``extension_optional: [{"qkdstack_relay_path": true}]``: each key's ``key_extension`` lists the sites it
crossed, source to destination (every site in between is a trusted node that saw the key)."""

BODY_BUDGET = 40_000
"""Bytes of key ciphertext (base64) per hop message: larger requests go as several relays (the KME-to-KME
server takes bodies up to 64 KiB)."""


def wants_path(extensions: Sequence[Any] | None) -> bool:
    return any(
        (isinstance(e, dict) and e.get(PATH_EXTENSION) not in (None, False)) or e == PATH_EXTENSION
        for e in extensions or ()
    )


@dataclass
class _Group:
    """Relay requests of one kind (destination, master, slaves, size) waiting for the next group relay."""

    queue: collections.deque = field(default_factory=collections.deque)
    running: bool = False


@dataclass(frozen=True)
class SiteConfig:
    """What the ETSI 014 server reads from ``.config`` (the limits are those of the site's link KMEs)."""

    kme_id: str
    sae_ids: frozenset[str]
    key_size: int
    min_key_size: int
    max_key_size: int
    max_key_per_request: int
    max_SAE_ID_count: int  # noqa: N815


class SiteKME:
    """The key management entity of one site of a network (see the module doc).

    ``site``: this site's name in ``topology``; ``links``: neighbour site -> the :class:`KME` of the link
    to it (``KMEConfig(kme_id=site, peer_kme_id=neighbour, sae_ids=site SAEs ∪ {RELAY_SAE})``, all on one
    shared key store); ``relay_store``: where keys relayed to this site wait for their slave SAEs;
    ``client``: the KME-to-KME client (this site's network certificate), None for a site that can
    neither relay nor be reached (tests). ``hop_timeout_s``: how long a hop may take, per hop left on
    the path (a source with three hops ahead waits at most three times this; keep the total below the
    consumers' own HTTP timeout, 10 s for :class:`~qkdstack.apps.keysource.Etsi014Client`).
    ``state_interval_s``, ``state_max_age_s``: link-state pulls (:mod:`qkdstack.network.routing`);
    ``unreachable_hold_s``: how long a neighbour that did not answer, or a link a relay failed on,
    is avoided. Call :meth:`start` to pull link state periodically and :meth:`close` at the end.
    """

    def __init__(
        self,
        site: str,
        topology: Topology,
        links: Mapping[str, KME],
        relay_store: RelayStore,
        client: KMEClient | None = None,
        *,
        hop_timeout_s: float = 3.0,
        state_interval_s: float = 1.0,
        state_max_age_s: float = 10.0,
        unreachable_hold_s: float = 5.0,
    ) -> None:
        if site not in topology.sites:
            raise ConfigError(f"[site] name: {site!r} is not a site of the topology")
        if not links:
            raise ConfigError(f"[[links]]: site {site!r} has no link KME")
        for peer, kme in links.items():
            if topology.link_between(site, peer) is None:
                raise ConfigError(f"[[links]] peer: the topology has no link between {site!r} and {peer!r}")
            if RELAY_SAE not in kme.config.sae_ids:
                raise ConfigError(f"[[links]] peer {peer!r}: the link KME must serve the relay SAE {RELAY_SAE!r}")
        first = next(iter(links.values())).config
        for peer, kme in links.items():
            c = kme.config
            if (c.key_size, c.min_key_size, c.max_key_size, c.max_key_per_request) != (
                first.key_size, first.min_key_size, first.max_key_size, first.max_key_per_request
            ):
                raise ConfigError(f"[[links]] peer {peer!r}: every link KME of a site needs the same [kms] key sizes")
        self.site = site
        self.topology = topology
        self.links = dict(links)
        self.relay_store = relay_store
        self.client = client
        self.hop_timeout_s = hop_timeout_s
        self.state_interval_s = state_interval_s
        self.unreachable_hold_s = unreachable_hold_s
        self.config = SiteConfig(
            kme_id=site,
            sae_ids=frozenset(topology.sites[site].sae) - {RELAY_SAE},
            key_size=first.key_size,
            min_key_size=first.min_key_size,
            max_key_size=first.max_key_size,
            max_key_per_request=first.max_key_per_request,
            max_SAE_ID_count=first.max_SAE_ID_count,
        )
        self.remote_sae_ids: frozenset[str] = frozenset(
            s for name, spec in topology.sites.items() if name != site for s in spec.sae
        )
        self.link_state = LinkStateTable(state_max_age_s)
        self._unreachable: dict[str, float] = {}  # neighbour -> monotonic time until which it counts as down
        self._suspect: dict[frozenset[str], float] = {}  # links a relay just failed on -> until when avoided
        self._task: asyncio.Task | None = None
        self._groups: dict[tuple, _Group] = {}
        self._undelivered: dict[str, list[str]] = {}  # neighbour -> link-key IDs of hop messages it never got
        self._background: set[asyncio.Task] = set()
        self.counters = {"relays_started": 0, "relays_delivered": 0, "relays_failed": 0, "forwarded": 0,
                         "received": 0, "auth_failures": 0, "voided": 0}
        """Relay counters (``status.json``): relays this site started / completed / that failed, hops it
        forwarded, keys stored here as a destination, messages that failed their MAC, keys voided here."""

    def __repr__(self) -> str:
        return f"SiteKME({self.site!r}, links={sorted(self.links)!r})"

    # -- life cycle -------------------------------------------------------------------------------

    async def start(self) -> None:
        """Pull link state from the neighbours now and every ``state_interval_s`` (needs a client)."""
        if self.client is None or self._task is not None:
            return

        async def run() -> None:
            while True:
                try:
                    await self.refresh_link_state()
                except (QKDError, OSError) as exc:  # a neighbour is down: its reports age out
                    log.debug("link-state pull failed: %s", type(exc).__name__)
                await asyncio.sleep(self.state_interval_s)

        self._task = asyncio.get_running_loop().create_task(run())

    async def close(self) -> None:
        tasks = [t for t in (self._task, *self._background) if t is not None]
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(BaseException):
                await t
        self._task = None

    def knows_site(self, site: str) -> bool:
        return site in self.topology.sites and site != self.site

    # -- link state ---------------------------------------------------------------------------------

    def _neighbour_down(self, peer: str) -> bool:
        until = self._unreachable.get(peer)
        return until is not None and time.monotonic() < until

    async def own_report(self) -> SiteReport:
        """This site's links: up (peer KME attached, neighbour's API answering) and chunks it can send."""
        links: dict[str, tuple[bool, int]] = {}
        for peer, kme in self.links.items():
            counts = await kme.store.counts(kme.config.link_id)
            up = kme.peer is not None and not self._neighbour_down(peer) and kme.rolled_back is None
            links[peer] = (up, counts.available[kme.config.own_pool])
        return SiteReport(self.site, time.time_ns(), links)

    async def refresh_link_state(self) -> None:
        """One pull round: ask every neighbour for the reports it holds, keep the newest of each."""
        self.link_state.merge(await self.own_report())
        if self.client is None:
            return

        async def pull(peer: str) -> None:
            url = self.topology.sites[peer].kme_url
            if not url:
                return
            try:
                status, body = await self.client.get(url, LINK_STATE, timeout_s=min(self.hop_timeout_s, 5.0))
            except ChannelError:
                self._unreachable[peer] = time.monotonic() + self.unreachable_hold_s
                return
            self._unreachable.pop(peer, None)
            await self._release_undelivered(peer)
            if status != 200 or not isinstance(body.get("reports"), list):
                return
            for raw in body["reports"]:
                report = SiteReport.from_wire(raw)
                if report is not None and report.site != self.site and report.site in self.topology.sites:
                    self.link_state.merge(report)

        await asyncio.gather(*(pull(p) for p in sorted(self.links)))

    async def handle_link_state(self, sender: str) -> dict[str, Any]:
        """Answer a neighbour's pull: this site's report now and every fresh report held."""
        own = await self.own_report()
        self.link_state.merge(own)
        return {"reports": [r.to_wire() for r in self.link_state.fresh()]}

    def _needed_chunks(self, number: int, size: int) -> int:
        chunk = next(iter(self.links.values())).store.chunk_bits
        return number * chunks_per_key(size, chunk) + chunks_per_key(MAC_KEY_BITS, chunk)

    async def route(self, destination: str, number: int = 1, size: int | None = None,
                    excluded: Sequence[frozenset[str]] = ()) -> list[str]:
        """The path for a relay to ``destination``; :class:`RelayError` 503 (``no_path``) when none exists."""
        size = self.config.key_size if size is None else size
        own = await self.own_report()
        self.link_state.merge(own)
        states = self.link_state.directions()
        now = time.monotonic()
        self._suspect = {k: t for k, t in self._suspect.items() if t > now}
        path = shortest_path(
            self.topology.sites, [link.ends for link in self.topology.links], self.site, destination, states,
            self._needed_chunks(number, size), [*excluded, *self._suspect],
        )
        if path is None:
            raise RelayError(
                503, f"no path from {self.site} to {destination}: every route has a link that is down or short of key",
                code="no_path",
            )
        return path

    # -- consumers' calls (ETSI GS QKD 014 semantics) -------------------------------------------------

    def _check_sae(self, sae_id: str) -> None:
        if sae_id == RELAY_SAE:
            raise KMEError(401, "the SAE ID is reserved for the key relay between KMEs", [{"SAE_ID": sae_id}])
        if sae_id not in self.config.sae_ids:
            raise KMEError(401, "SAE is not registered at this KME", [{"SAE_ID": sae_id}])

    def _site_of_slave(self, slave: str) -> str:
        if slave == RELAY_SAE:
            raise KMEError(400, "the SAE ID is reserved for the key relay between KMEs", [{"slave_SAE_ID": slave}])
        site = self.topology.site_of_sae(slave)
        if site is None:
            raise KMEError(400, "slave SAE ID is not known in the network", [{"slave_SAE_ID": slave}])
        if site == self.site:
            raise KMEError(400, "slave SAE ID is at this site (no QKD link is involved)", [{"slave_SAE_ID": slave}])
        return site

    async def status(self, master_sae: str, slave_sae: str) -> dict[str, Any]:
        """ETSI 014 Status; for a relayed destination, counts along the current path (0 when none)."""
        self._check_sae(master_sae)
        dest = self._site_of_slave(slave_sae)
        if dest in self.links:
            return await self.links[dest].status(master_sae, slave_sae)
        c = self.config
        per_key = self._needed_chunks(1, c.key_size)
        stored = 0
        with contextlib.suppress(RelayError):
            path = await self.route(dest)
            states = self.link_state.directions()
            stored = min(
                (states[(a, b)].available if (a, b) in states else 0) for a, b in itertools.pairwise(path)
            ) // per_key
        first = next(iter(self.links.values()))
        return status_document(c, dest, master_sae, slave_sae, stored_key_count=stored,
                               max_key_count=first.store.limits(first.config.link_id).capacity // 2 // per_key)

    async def enc_keys(
        self,
        master_sae: str,
        slave_sae: str,
        number: int | None = None,
        size: int | None = None,
        additional_slave_SAE_IDs: Sequence[str] | None = None,
        extension_mandatory: Sequence[Any] | None = None,
        extension_optional: Sequence[Any] | None = None,
    ) -> dict[str, Any]:
        """ETSI 014 Get key: through the link KME when every slave is at one neighbour, else relayed."""
        self._check_sae(master_sae)
        slaves = [slave_sae, *(additional_slave_SAE_IDs or [])]
        sites = [self._site_of_slave(s) for s in slaves]
        want_path = wants_path(extension_optional)
        if len(set(sites)) == 1 and sites[0] in self.links:
            kme = self.links[sites[0]]
            answer = await kme.enc_keys(master_sae, slave_sae, number, size, additional_slave_SAE_IDs,
                                        extension_mandatory, extension_optional)
            return self._with_path(answer, [self.site, sites[0]]) if want_path else answer
        number, size = check_key_request(self.config, number, size, extension_mandatory, slaves)
        if self.client is None:
            raise KMEError(503, "this KME cannot relay keys (no KME-to-KME client is configured)")
        by_site: dict[str, list[str]] = {}
        for s, site in zip(slaves, sites, strict=True):
            by_site.setdefault(site, []).append(s)
        return await self._relay(master_sae, by_site, number, size, want_path)

    @staticmethod
    def _with_path(answer: dict[str, Any], path: Sequence[str], paths: Mapping[str, Sequence[str]] | None = None):
        for entry in answer.get("keys", []):
            ext = dict(entry.get("key_extension") or {})
            ext[PATH_EXTENSION] = list(paths[entry["key_ID"]] if paths else path)
            entry["key_extension"] = ext
        return answer

    def _per_message(self, size: int) -> int:
        """How many keys of ``size`` bits one hop message carries (body budget; pads + MAC in one KME call)."""
        return max(1, min(BODY_BUDGET // ((size // 8 + 2) * 4 // 3 + 48), self.config.max_key_per_request - 1))

    def _failed(self, exc: RelayError) -> KMEError:
        self.counters["relays_failed"] += 1
        details: list[dict[str, Any]] = [{"reason": exc.code}]
        if exc.hop is not None:
            details[0]["failed_hop"] = list(exc.hop)
        log.warning("key relay from %s failed: %s", self.site, exc.message)
        return KMEError(503, f"key relay failed: {exc.message}", details)

    async def _relay(
        self, master: str, by_site: dict[str, list[str]], number: int, size: int, want_path: bool
    ) -> dict[str, Any]:
        """Relay ``number`` fresh keys to every destination site; answer the master once all hold them."""
        self.counters["relays_started"] += 1
        if len(by_site) == 1 and number <= self._per_message(size):
            (dest, slaves), = by_site.items()
            try:
                key_ids, keys, path = await self._relay_grouped(dest, slaves, master, number, size)
            except RelayError as exc:
                raise self._failed(exc) from None
            self.counters["relays_delivered"] += 1
            answer = {"keys": [{"key_ID": kid, "key": base64.b64encode(k).decode("ascii")}
                               for kid, k in zip(key_ids, keys, strict=True)]}
            return self._with_path(answer, path) if want_path else answer
        key_ids = [str(uuid.uuid4()) for _ in range(number)]
        keys: list[bytes | None] = [None] * number
        per_batch = self._per_message(size)
        batches = [list(range(i, min(i + per_batch, number))) for i in range(0, number, per_batch)]
        sent: dict[str, list[str]] = {}  # destination -> key IDs that may be stored there
        paths: dict[str, dict[str, list[str]]] = {}
        try:
            for dest, slaves in by_site.items():
                for batch in batches:
                    ids = [key_ids[i] for i in batch]
                    given = [keys[i] for i in batch]
                    got, path = await self._relay_batch(
                        dest, slaves, master, ids, None if given[0] is None else given, size, sent
                    )
                    for i, k in zip(batch, got, strict=True):
                        keys[i] = k
                    paths.setdefault(dest, {}).update({kid: path for kid in ids})
        except RelayError as exc:
            await self._void(sent, master)
            raise self._failed(exc) from None
        self.counters["relays_delivered"] += 1
        answer = {"keys": [{"key_ID": kid, "key": base64.b64encode(k).decode("ascii")}
                           for kid, k in zip(key_ids, keys, strict=True) if k is not None]}
        if want_path:
            first = next(iter(by_site))
            self._with_path(answer, [], paths[first])
        return answer

    async def _relay_grouped(
        self, dest: str, slaves: list[str], master: str, number: int, size: int
    ) -> tuple[list[str], list[bytes], list[str]]:
        """Relay ``number`` keys, sharing one relay with the requests of the same kind waiting meanwhile.

        Requests with the same destination, master, slaves and key size that arrive while such a relay
        is on its way are sent together in the next one (one hop message, one MAC key and one HTTPS
        request per hop for all of them): group relay, as the key store's group commit. A lone request
        goes at once. Returns (key IDs, keys, path); a failure fails every request of that relay.
        """
        group_key = (dest, master, tuple(slaves), size)
        group = self._groups.setdefault(group_key, _Group())
        fut: asyncio.Future = asyncio.get_running_loop().create_future()
        group.queue.append((number, fut))
        if not group.running:
            group.running = True
            task = asyncio.get_running_loop().create_task(self._run_group(group_key, group))
            self._background.add(task)
            task.add_done_callback(self._background.discard)
        return await fut

    async def _run_group(self, group_key: tuple, group: _Group) -> None:
        dest, master, slaves, size = group_key
        cap = self._per_message(size)
        try:
            while group.queue:
                take: list[tuple[int, asyncio.Future]] = []
                total = 0
                while group.queue and (not take or total + group.queue[0][0] <= cap):
                    n, f = group.queue.popleft()
                    if not f.done():  # a caller cancelled meanwhile takes no key
                        take.append((n, f))
                        total += n
                if not take:
                    continue
                ids = [str(uuid.uuid4()) for _ in range(total)]
                sent: dict[str, list[str]] = {}
                try:
                    keys, path = await self._relay_batch(dest, list(slaves), master, ids, None, size, sent)
                except RelayError as exc:
                    await self._void(sent, master)
                    for _, f in take:
                        if not f.done():
                            f.set_exception(RelayError(exc.status, exc.message, exc.hop, exc.code))
                    continue
                except BaseException as exc:  # the callers must hear of it, whatever it is
                    for _, f in take:
                        if not f.done():
                            f.set_exception(RelayError(503, f"relay error: {type(exc).__name__}", None, "refused"))
                    if isinstance(exc, asyncio.CancelledError):
                        raise
                    continue
                start = 0
                for n, f in take:
                    if not f.done():
                        f.set_result((ids[start:start + n], keys[start:start + n], path))
                    start += n
        finally:
            group.running = False
            if asyncio.current_task().cancelling():  # the site is closing: nobody will send the rest
                while group.queue:
                    _, f = group.queue.popleft()
                    if not f.done():
                        f.set_exception(RelayError(503, "the KME is shutting down", None, "refused"))
            if not group.queue:
                self._groups.pop(group_key, None)

    async def _relay_batch(
        self, dest: str, slaves: list[str], master: str, ids: list[str], keys: list[bytes] | None, size: int,
        sent: dict[str, list[str]],
    ) -> tuple[list[bytes], list[str]]:
        """One relay of ``ids`` to ``dest``; on an unreachable hop, one more try on a path avoiding it."""
        excluded: list[frozenset[str]] = []
        for attempt in range(2):
            path = await self.route(dest, len(ids), size, excluded)
            sent.setdefault(dest, []).extend(i for i in ids if i not in sent.get(dest, []))
            try:
                got = await self._forward(str(uuid.uuid4()), path, 0, ids, keys, size, master, slaves)
                return got, path
            except RelayError as exc:
                if exc.code not in ("unreachable", "no_key") or exc.hop is None or attempt == 1:
                    raise
                failed = frozenset(exc.hop)
                self._suspect[failed] = time.monotonic() + self.unreachable_hold_s
                excluded.append(failed)
                await self._void({dest: ids}, master)
                log.info("relay to %s failed on hop %s-%s (%s); trying another path", dest, *exc.hop, exc.code)
                try:
                    await self.route(dest, len(ids), size, excluded)
                except RelayError:
                    raise exc from None
        raise AssertionError("unreachable")

    async def _take_link_keys(self, peer: str, number: int, size: int) -> tuple[list[Any], Any]:
        """``number`` pads of ``size`` bits and one MAC key from the link to ``peer`` (erased here once read)."""
        kme = self.links[peer]
        try:
            if size == MAC_KEY_BITS and number + 1 <= kme.config.max_key_per_request:
                entries = (await kme.enc_keys(RELAY_SAE, RELAY_SAE, number + 1, size))["keys"]
                return entries[:number], entries[number]
            pads = (await kme.enc_keys(RELAY_SAE, RELAY_SAE, number, size))["keys"]
            mac = (await kme.enc_keys(RELAY_SAE, RELAY_SAE, 1, MAC_KEY_BITS))["keys"][0]
            return pads, mac
        except KMEError as exc:
            raise RelayError(503, f"no key for the relay on link {self.site}-{peer}: {exc.message}",
                             (self.site, peer), "no_key") from None

    async def _forward(
        self, relay_id: str, path: Sequence[str], hop: int, ids: list[str], keys: list[bytes] | None, size: int,
        master: str, slaves: Sequence[str],
    ) -> list[bytes]:
        """Send hop ``hop`` of ``path`` (this site is ``path[hop]``) and wait for the destination's answer.

        Returns the end-to-end keys (the first hop's pads when ``keys`` is None).
        """
        peer = path[hop + 1]
        if peer not in self.links:
            raise RelayError(400, f"the relay path leads from {self.site} to {peer}, which is not a neighbour",
                             (self.site, peer))
        url = self.topology.sites[peer].kme_url
        if not url or self.client is None:
            raise RelayError(503, f"the KME-to-KME address of {peer} is not known here", (self.site, peer),
                             "unreachable")
        pad_entries, mac_entry = await self._take_link_keys(peer, len(ids), size)
        pads = [base64.b64decode(e["key"]) for e in pad_entries]
        message = build_hop_message(
            relay_id=relay_id, key_ids=ids, keys=keys, pads=pads, pad_ids=[e["key_ID"] for e in pad_entries],
            mac_key=base64.b64decode(mac_entry["key"]), mac_id=mac_entry["key_ID"], size=size, master=master,
            slaves=slaves, path=path, hop=hop, link_id=self.links[peer].config.link_id,
        )
        timeout = self.hop_timeout_s * (len(path) - 1 - hop)
        try:
            status, body = await self.client.post(url, EXT_KEYS, message, timeout_s=timeout)
        except ChannelError:
            self._unreachable[peer] = time.monotonic() + self.unreachable_hold_s
            # the peer still holds these link keys reserved for the relay: ask it to drop them once it answers
            self._undelivered.setdefault(peer, []).extend([*(e["key_ID"] for e in pad_entries), mac_entry["key_ID"]])
            raise RelayError(503, f"the KME of {peer} cannot be reached from {self.site}", (self.site, peer),
                             "unreachable") from None
        if status != 200:
            raise RelayError.from_answer(503, body, (self.site, peer))
        return pads if keys is None else list(keys)

    # -- the KME-to-KME server's calls ------------------------------------------------------------------

    async def handle_ext_keys(self, sender: str, body: Any) -> dict[str, Any]:
        """One hop of a relay arrives from the neighbour ``sender`` (authenticated by its TLS certificate)."""
        msg = parse_hop_message(body, max_keys=2 * self.config.max_key_per_request)
        hop = (msg.sender, msg.receiver)
        if msg.sender != sender or msg.receiver != self.site:
            raise RelayError(400, f"the relay message names hop {msg.sender}->{msg.receiver}, but it came from "
                             f"{sender} to {self.site}", hop)
        kme = self.links.get(sender)
        if kme is None or msg.link_id != kme.config.link_id:
            raise RelayError(400, f"{self.site} has no link {msg.link_id!r} to {sender}", hop)
        ids = [*msg.pad_ids, msg.mac_id]
        try:
            got: dict[str, bytes] = {}
            step = kme.config.max_key_per_request
            for i in range(0, len(ids), step):
                answer = await kme.dec_keys(RELAY_SAE, RELAY_SAE, ids[i:i + step])
                got.update({e["key_ID"]: base64.b64decode(e["key"]) for e in answer["keys"]})
        except KMEError as exc:
            raise RelayError(400 if exc.status == 400 else 503,
                             f"the relay's link keys on hop {sender}->{self.site} are not available at "
                             f"{self.site}: {exc.message}", hop) from None
        try:
            keys = msg.open([got[p] for p in msg.pad_ids], got[msg.mac_id])
        except RelayAuthError:
            self.counters["auth_failures"] += 1
            log.warning("relay message on hop %s->%s failed authentication; relay aborted", sender, self.site)
            raise
        if msg.last:
            if any(s not in self.config.sae_ids for s in msg.slaves):
                raise RelayError(400, f"a target SAE of the relay is not at {self.site}", hop)
            if self.topology.site_of_sae(msg.master) != msg.path[0]:
                raise RelayError(400, f"the initiator SAE of the relay is not at its source {msg.path[0]}", hop)
            try:
                await self.relay_store.put(
                    [RelayedKey(kid, k, msg.path) for kid, k in zip(msg.key_ids, keys, strict=True)],
                    msg.master, msg.slaves, msg.path[0],
                )
            except KeyStoreError as exc:
                raise RelayError(503, f"the relay store of {self.site} refused the keys: {exc}", hop) from None
            self.counters["received"] += len(keys)
        else:
            self.counters["forwarded"] += 1
            await self._forward(msg.relay_id, msg.path, msg.hop + 1, list(msg.key_ids), keys, msg.size, msg.master,
                                msg.slaves)
        return {"ack_status": "relayed", "key_IDs": list(msg.key_ids)}

    async def _release_undelivered(self, peer: str) -> None:
        """Ask ``peer`` to drop the link keys of hop messages that never reached it (they wait there,
        reserved for the relay, and would never be used). Best effort; kept in memory only."""
        ids = self._undelivered.pop(peer, [])
        if not ids or self.client is None:
            return
        try:
            status, _ = await self.client.post(self.topology.sites[peer].kme_url, VOID, {"link_key_IDs": ids},
                                               timeout_s=min(self.hop_timeout_s, 5.0))
        except ChannelError:
            status = 0
        if status != 200:
            self._undelivered.setdefault(peer, []).extend(ids)

    async def _drop_link_keys(self, sender: str, ids: Any) -> int:
        """Fetch (so erase) link keys the neighbour ``sender`` reserved here for a hop message that never came."""
        kme = self.links.get(sender)
        if kme is None or not isinstance(ids, list) or len(ids) > 64 * self.config.max_key_per_request:
            raise RelayError(400, "link_key_IDs must be a list of key IDs of the link to the sender")
        dropped = 0
        for kid in ids:
            try:
                await kme.dec_keys(RELAY_SAE, RELAY_SAE, [str(uuid.UUID(str(kid)))])
                dropped += 1
            except (KMEError, ValueError):  # already fetched (the message did arrive) or unknown
                continue
        return dropped

    async def handle_void(self, sender: str, body: Any) -> dict[str, Any]:
        """The source ``sender`` of a failed relay asks this site to delete what it may have stored.

        ``{"link_key_IDs": [...]}`` (an extension): the neighbour ``sender`` asks this site to drop the
        link keys it reserved here for hop messages that never arrived.
        """
        if isinstance(body, dict) and "link_key_IDs" in body:
            n = await self._drop_link_keys(sender, body["link_key_IDs"])
            return {"ack_status": "voided", "voided": n}
        ids = body.get("key_IDs") if isinstance(body, dict) else None
        if not isinstance(ids, list) or not ids or len(ids) > 4 * self.config.max_key_per_request:
            raise RelayError(400, "key_IDs must be a non-empty list")
        try:
            ids = [str(uuid.UUID(str(k))) for k in ids]
        except ValueError:
            raise RelayError(400, "a key_ID is not a UUID") from None
        n = await self.relay_store.void(ids, sender)
        self.counters["voided"] += n
        return {"ack_status": "voided", "key_IDs": ids, "voided": n}

    async def _void(self, sent: Mapping[str, list[str]], master: str) -> None:
        """Best effort: ask each destination to delete the keys of a failed relay (errors are logged)."""
        if self.client is None:
            return

        async def one(dest: str, ids: list[str]) -> None:
            url = self.topology.sites[dest].kme_url
            try:
                status, _ = await self.client.post(url, VOID, {"key_IDs": ids, "initiator_sae_id": master},
                                                   timeout_s=min(self.hop_timeout_s, 5.0))
                if status != 200:
                    log.warning("%s refused to void %d relayed keys (HTTP %d)", dest, len(ids), status)
            except ChannelError:
                log.warning("could not void %d relayed keys at %s (unreachable)", len(ids), dest)

        await asyncio.gather(*(one(d, ids) for d, ids in sent.items() if ids and d in self.topology.sites))

    async def dec_keys(
        self, slave_sae: str, master_sae: str, key_ids: Sequence[Any], extension_optional: Sequence[Any] | None = None
    ) -> dict[str, Any]:
        """ETSI 014 Get key with key IDs: relayed keys from the relay store, others from the master's link."""
        self._check_sae(slave_sae)
        if not key_ids:
            raise KMEError(400, "key_ID or key_IDs is required")
        if len(key_ids) > self.config.max_key_per_request:
            raise KMEError(400, f"at most max_key_per_request ({self.config.max_key_per_request}) key IDs")
        try:
            ids = [str(uuid.UUID(str(k))) for k in key_ids]
        except ValueError:
            raise KMEError(400, MSG_NOT_FOUND, [{"reason": "key_ID is not a UUID"}]) from None
        want_path = wants_path(extension_optional)
        try:
            present = await self.relay_store.contains(ids)
        except KeyStoreError:
            raise KMEError(503, "relay store error") from None
        if all(present):
            try:
                got = await self.relay_store.take(ids, slave_sae, master_sae)
            except KeyNotAuthorized:
                raise KMEError(401, "the SAE is not authorized to get one or more keys specified") from None
            except KeyNotFound:
                raise KMEError(400, MSG_NOT_FOUND) from None
            except KeyStoreError:
                raise KMEError(503, "relay store error during delivery") from None
            answer = {"keys": [{"key_ID": k.key_id, "key": base64.b64encode(k.key).decode("ascii")} for k in got]}
            if want_path:
                self._with_path(answer, [], {k.key_id: list(k.path) for k in got})
            return answer
        if any(present):
            raise KMEError(400, MSG_NOT_FOUND)
        master_site = self.topology.site_of_sae(master_sae)
        kme = self.links.get(master_site or "")
        if kme is None:
            raise KMEError(400, MSG_NOT_FOUND)
        answer = await kme.dec_keys(slave_sae, master_sae, ids, extension_optional)
        return self._with_path(answer, [master_site, self.site]) if want_path else answer
