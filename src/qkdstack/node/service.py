"""The node service: one site of a QKD link, tying device, post-processing, authentication and KMS together.

A node runs, until stopped or until ``[protocol] rounds`` rounds are done:

* its half of the device: the *transmitter* (Alice's source and the fibre) emits a frame and
  sends the arriving light over the quantum-channel connection; the *receiver* (Bob) detects it;
* a distillation round (:mod:`qkdstack.protocol.round`) over the classical TCP link, whose
  whole transcript is authenticated: by Wegman–Carter tags keyed from the authentication key
  pool (:mod:`qkdstack.auth.session`), or, for the very first round in the ``pki`` and ``pgp``
  modes, by signatures (:mod:`qkdstack.auth.bootstrap`), after which the pool is seeded from
  that round's key;
* key handling: nothing of a round is used before its tags verify. The pool takes its refill
  from the front of the round key; 256 bits go to the KME peer link's key ring; the rest goes to
  the key store under the round's block ID, identical at both sites. A round the peer may not
  have accepted yet stays *pending* (on disk, 0600) until a later round settles it;
* the KME (:mod:`qkdstack.kms.kme`) with its ETSI GS QKD 014 server (mutual TLS) and, if
  configured, in-unit delivery over a Unix socket; the KME peer link runs on its own
  connection (:mod:`qkdstack.node.kms_link`).

The receiver listens on the three link addresses, the transmitter connects to them. A broken
connection (or a tampered frame the transport rejects) aborts the round in flight; the
transmitter reconnects, both ends authenticate each other again with an empty authenticated
round (entity authentication), and key distillation resumes.

After every round the node writes ``status.json`` in its data directory (atomic, no key bytes):
rounds accepted and aborted, the last round's figures, key-store levels and the
authentication pool's accounting. ``qkdstack demo`` reads it for its live display.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qkdstack.auth.bootstrap import BOOTSTRAP_ROUND_ID, begin_bootstrap_round
from qkdstack.auth.pool import AuthKeyPool, RoundOutcome
from qkdstack.auth.psk import pool_from_psk
from qkdstack.auth.session import authenticate_peer, begin_round
from qkdstack.certs import atomic_write
from qkdstack.errors import AuthenticationError, ChannelError, ConfigError, KeyPoolExhausted, PeerAbort
from qkdstack.kms.etsi014 import TLSFiles, serve_etsi014
from qkdstack.kms.kme import KME, KMEConfig
from qkdstack.kms.local import serve_local
from qkdstack.kms.store import LinkLimits, open_store
from qkdstack.node.config import NodeConfig, parse_address
from qkdstack.node.credentials import bootstrap_credentials
from qkdstack.node.kms_link import KmsPeerLink
from qkdstack.node.quantum import TransmitterRecord, recv_light, send_light
from qkdstack.physics.eve import parse_eve
from qkdstack.physics.split import Receiver, Transmitter
from qkdstack.protocol import round as distill
from qkdstack.protocol.keyblock import Abort, KeyBlock
from qkdstack.protocol.round import RoundConfig, recv_fresh
from qkdstack.transport.tcp import TcpChannel, connect, serve

log = logging.getLogger("qkdstack.node")

LINK_KEY_BYTES = 32
"""QKD key bytes per accepted round for the KME peer link's key ring."""
KEPT_LINK_KEYS = 4


@dataclass
class NodeStats:
    """Counters for status.json (no key bytes)."""

    started: float = field(default_factory=time.time)
    rounds_accepted: int = 0
    rounds_aborted: int = 0
    secret_bits: int = 0
    stored_bits: int = 0
    auth_bits_consumed: int = 0
    pulses: int = 0
    reconnections: int = 0
    last: dict[str, Any] = field(default_factory=dict)
    aborts: list[str] = field(default_factory=list)


class Node:
    """One site's node service; run it with :meth:`run`."""

    def __init__(self, config: NodeConfig) -> None:
        self.cfg = config
        self.site = config.site
        self.transmitter = config.site.role == "transmitter"
        self.role = "alice" if self.transmitter else "bob"
        self.data_dir = config.data_dir
        self.link_id = "-".join(sorted((self.site.name, self.site.peer)))
        params = config.device.params()
        self.params = params
        self.round_config = RoundConfig.for_source(
            params.source,
            eps_sec=config.protocol.eps_sec,
            eps_cor=config.protocol.eps_cor,
            max_qber=config.protocol.max_qber,
            max_phase_error=config.protocol.max_phase_error,
            cascade_schedule=config.protocol.cascade_schedule,
        )
        seed = config.device.seed
        if self.transmitter:
            eve = parse_eve(config.device.eve, "[device] eve")
            self.tx: Transmitter | None = Transmitter(params, eve=eve, seed=seed)
            self.rx: Receiver | None = None
        else:
            self.tx = None
            self.rx = Receiver(params.receiver, params.channel.misalignment, params.source.rep_rate_hz,
                               seed=None if seed is None else seed + 1)
        self.stats = NodeStats()
        self.pool: AuthKeyPool | None = None
        self.kme: KME | None = None
        self.link_keys: dict[int, bytes] = {}
        self.link_keys_changed = asyncio.Event()
        self.stop = asyncio.Event()
        self.etsi_url: str | None = None
        self._accepted: dict[str, asyncio.Queue[tuple[TcpChannel, asyncio.Event]]] = {}
        self._frame_id = 0
        self.finished = False
        """True once the final (settling) round is done: the node then only serves keys."""

    def __repr__(self) -> str:
        return f"Node({self.site.name!r}, role={self.site.role!r})"

    # ---------------------------------------------------------------------------------- files

    @property
    def pool_path(self) -> Path:
        return self.data_dir / "auth-pool.json"

    @property
    def pending_dir(self) -> Path:
        return self.data_dir / "pending"

    def _load_state(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.data_dir, 0o700)
        self.pending_dir.mkdir(mode=0o700, exist_ok=True)
        if self.pool_path.exists():
            self.pool = AuthKeyPool.load(self.pool_path)
        elif self.cfg.auth.bootstrap == "psk":
            self.pool = pool_from_psk(self.cfg.resolve(self.cfg.auth.psk_file), path=self.pool_path)
            if self.pool.link_id != self.link_id:
                raise ConfigError(
                    f"[auth] psk_file is for link {self.pool.link_id!r}, but this node serves link {self.link_id!r}"
                )
        keys_file = self.data_dir / "kms-link-keys.json"
        if keys_file.exists():
            self.link_keys = {int(r): bytes.fromhex(k) for r, k in json.loads(keys_file.read_text()).items()}

    def _save_link_keys(self) -> None:
        doc = {str(r): k.hex() for r, k in sorted(self.link_keys.items())[-KEPT_LINK_KEYS:]}
        atomic_write(self.data_dir / "kms-link-keys.json", json.dumps(doc).encode(), 0o600)

    async def write_status(self) -> None:
        store = None
        if self.kme is not None:
            counts = await self.kme.store.counts(self.kme.config.link_id)
            store = {"stored_keys": counts.stored, "key_size_bits": self.kme.config.key_size}
        elapsed = max(time.time() - self.stats.started, 1e-9)
        doc = {
            "site": self.site.name,
            "role": self.site.role,
            "link": self.link_id,
            "updated": time.time(),
            "etsi014_url": self.etsi_url,
            "finished": self.finished,
            "rounds_accepted": self.stats.rounds_accepted,
            "rounds_aborted": self.stats.rounds_aborted,
            "secret_bits": self.stats.secret_bits,
            "stored_bits": self.stats.stored_bits,
            "secret_key_rate_bit_per_s_wall": self.stats.secret_bits / elapsed,
            "secret_key_rate_bit_per_s_device": (
                self.stats.secret_bits / self.stats.pulses * self.params.source.rep_rate_hz if self.stats.pulses else 0
            ),
            "auth_bits_consumed": self.stats.auth_bits_consumed,
            "auth_pool": self.pool.report() if self.pool is not None else None,
            "store": store,
            "reconnections": self.stats.reconnections,
            "last_round": self.stats.last,
            "recent_aborts": self.stats.aborts[-5:],
        }
        atomic_write(self.data_dir / "status.json", json.dumps(doc, indent=1, default=str).encode(), 0o600)

    # ------------------------------------------------------------------------------ connections

    async def _listen(self, name: str, address: str) -> asyncio.Server:
        host, port = parse_address("link", name, address)
        queue: asyncio.Queue[tuple[TcpChannel, asyncio.Event]] = asyncio.Queue()
        self._accepted[name] = queue

        async def handler(channel: TcpChannel) -> None:
            done = asyncio.Event()
            await queue.put((channel, done))
            with contextlib.suppress(asyncio.CancelledError):  # shutdown: no "exception in callback" noise
                await done.wait()

        try:
            return await serve(host, port, handler, timeout=self.cfg.link.timeout_s)
        except OSError as exc:  # taken (by another node?) or not this host's address: a configuration error
            why = os.strerror(exc.errno) if exc.errno else str(exc)
            raise ConfigError(f"[link] {name} {address} cannot be listened on ({why})") from None

    async def _open(self, name: str, address: str) -> tuple[TcpChannel, asyncio.Event]:
        """The transmitter connects; the receiver takes the next accepted connection."""
        if self.transmitter:
            host, port = parse_address("link", name, address)
            opening = connect(host, port, attempts=1_000_000, max_delay=1.0, timeout=self.cfg.link.timeout_s)
        else:
            opening = self._accepted[name].get()
        # Waiting for the peer must not outlive a stop request (a round in flight is still finished).
        task = asyncio.ensure_future(opening)
        stopping = asyncio.ensure_future(self.stop.wait())
        await asyncio.wait({task, stopping}, return_when=asyncio.FIRST_COMPLETED)
        stopping.cancel()
        if not task.done():
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
            raise _Stopped
        result = task.result()
        return (result, asyncio.Event()) if isinstance(result, TcpChannel) else result

    # ---------------------------------------------------------------------------------- rounds

    async def _agree_round_id(self, channel: TcpChannel, final: bool = False) -> tuple[int, bool]:
        """Both ends use one more than the larger of their last round IDs (bound into the transcript MAC).

        The transmitter also says whether this is the final, settling round (``final``): the
        receiver follows its decision, so the two ends never disagree about when to stop.
        """
        mine = self.pool.last_round_id if self.pool is not None else 0
        if self.transmitter:
            await channel.send("link.next", last=mine, final=final)
            theirs = int((await recv_fresh(channel, "link.next"))["last"])
        else:
            msg = await recv_fresh(channel, "link.next")
            theirs, final = int(msg["last"]), bool(msg["final"])
            await channel.send("link.next", last=mine, final=final)
        return max(mine, theirs) + 1, final

    async def _device_frame(self, qchan: TcpChannel) -> Any:
        n = self.cfg.device.pulses_per_frame
        if self.transmitter:
            assert self.tx is not None
            light = self.tx.emit(n)
            self._frame_id += 1
            await send_light(qchan, light, self._frame_id)
            return TransmitterRecord(self.tx, n)
        assert self.rx is not None
        self._frame_id, light = await recv_light(qchan)
        return self.rx.detect(light)

    async def _run_round(self, cchan: TcpChannel, qchan: TcpChannel, round_id: int) -> None:
        record = await self._device_frame(qchan)
        self.stats.pulses += self.cfg.device.pulses_per_frame
        party = distill.alice if self.transmitter else distill.bob
        if self.pool is None:
            await self._bootstrap_round(cchan, record, party)
            return
        auth = await begin_round(cchan, self.pool, self.role, round_id)
        outcome = await party(cchan, record, self.round_config)
        if isinstance(outcome, Abort):
            auth.abandon()
            await self._aborted(outcome.stage, outcome.reason, outcome.block_id)
            return
        try:
            result = await auth.finish(_key_bytes(outcome))
        except (AuthenticationError, PeerAbort) as exc:
            await self._aborted("authentication", str(exc), outcome.block_id)
            return
        self.stats.auth_bits_consumed += result.consumed_bits
        await self._settle(outcome, result)

    async def _bootstrap_round(self, cchan: TcpChannel, record: Any, party: Any) -> None:
        signer, verifier = bootstrap_credentials(self.cfg)
        boot = await begin_bootstrap_round(cchan, self.role, self.link_id, self.site.name)
        outcome = await party(cchan, record, self.round_config)
        if isinstance(outcome, Abort):
            boot.abandon()
            await self._aborted(outcome.stage, outcome.reason, outcome.block_id)
            return
        try:
            pool, rest = await boot.finish(signer, verifier, _key_bytes(outcome), path=self.pool_path)
        except (AuthenticationError, PeerAbort) as exc:
            await self._aborted("authentication", f"bootstrap refused: {exc}", outcome.block_id)
            return
        self.pool = pool
        log.info("%s: bootstrap by %s succeeded; authentication pool seeded from round %s",
                 self.site.name, self.cfg.auth.bootstrap, outcome.block_id[:8])
        # Pending until the first Wegman-Carter exchange verifies: only that proves the peer seeded its pool
        # from this round too (the last bootstrap message may be lost), see _release_settled.
        doc = {"block_id": outcome.block_id, "key": rest.hex()}
        atomic_write(self.pending_dir / f"{BOOTSTRAP_ROUND_ID}.json", json.dumps(doc).encode(), 0o600)
        self._count_accepted(outcome, None)
        await self.write_status()

    async def _settle(self, block: KeyBlock, result: RoundOutcome) -> None:
        """Store what the authenticated round outcome allows; keep the rest pending on disk."""
        await self._release_settled(result)
        self._count_accepted(block, result)
        if result.pending_round_id is None:
            await self._store(result.round_id, block.block_id, result.key_for_store)
        else:
            doc = {"block_id": block.block_id, "key": result.key_for_store.hex()}
            atomic_write(self.pending_dir / f"{result.pending_round_id}.json", json.dumps(doc).encode(), 0o600)
        await self.write_status()

    async def _store(self, round_id: int, block_id: str, key: bytes) -> None:
        link_key, rest = key[:LINK_KEY_BYTES], key[LINK_KEY_BYTES:]
        if len(link_key) == LINK_KEY_BYTES:
            self.link_keys[round_id] = link_key
            self._save_link_keys()
            self.link_keys_changed.set()
        if self.kme is not None and rest:
            chunks = await self.kme.add_block(block_id, rest)
            self.stats.stored_bits += chunks * self.kme.config.key_size

    def _count_accepted(self, block: KeyBlock, result: RoundOutcome | None) -> None:
        """Count an accepted round and record (and log) its figures."""
        self.stats.rounds_accepted += 1
        self.stats.secret_bits += block.length
        meta = block.to_dict()
        self.stats.last = {
            "block_id": block.block_id,
            "accepted": True,
            "key_bits": block.length,
            "qber_z": block.qber_key,
            "qber_x": block.qber_test,
            "leakage_bits": block.leakage_bits,
            "phase_error_bound": meta["finite_key"]["phase_error"],
            "auth_bits_consumed": result.consumed_bits if result else 0,
            "auth_refill_bits": result.refill_bits if result else 0,
            "auth_epsilon": result.epsilon if result else None,
            "stage_seconds": block.stage_seconds,
            "detections": block.stats.get("detections"),
        }
        self._log_round(self.stats.last)

    def _log_round(self, doc: dict[str, Any]) -> None:
        """Append the round's outcome (no key bytes) to data/rounds.jsonl."""
        with open(self.data_dir / "rounds.jsonl", "a") as f:
            f.write(json.dumps({"time": time.time(), **doc}, default=str) + "\n")

    async def _aborted(self, stage: str, reason: str, block_id: str) -> None:
        self.stats.rounds_aborted += 1
        self.stats.last = {"block_id": block_id, "accepted": False, "stage": stage, "reason": reason}
        self.stats.aborts.append(f"{stage}: {reason}")
        self._log_round(self.stats.last)
        log.warning("%s: round %s aborted in %s: %s", self.site.name, block_id[:8], stage, reason)
        await self.write_status()

    # ---------------------------------------------------------------------------------- loops

    def _rounds_done(self) -> bool:
        """The transmitter's decision that the configured number of rounds is done."""
        limit = self.cfg.protocol.rounds
        return bool(limit) and self.stats.rounds_accepted + self.stats.rounds_aborted >= limit

    async def _session(self) -> None:
        """One pair of classical + quantum connections: entity authentication, then rounds."""
        cchan, cdone = await self._open("classical", self.cfg.link.classical)
        qchan, qdone = await self._open("quantum", self.cfg.link.quantum)
        try:
            await self._reconcile_pools(cchan)
            if self.pool is not None:
                round_id, _ = await self._agree_round_id(cchan)
                result = await authenticate_peer(cchan, self.pool, self.role, round_id)
                self.stats.auth_bits_consumed += result.consumed_bits
                await self._release_settled(result)
                log.info("%s: peer %s authenticated (round %d, %d key bits)", self.site.name, self.site.peer,
                         round_id, result.consumed_bits)
            while not self.stop.is_set() and not self.finished:
                if self.transmitter and self.kme is not None and await self.kme.is_full():
                    await asyncio.sleep(0.5)  # the store is full: pause key generation
                    continue
                round_id, final = await self._agree_round_id(cchan, final=self.transmitter and self._rounds_done())
                if final:
                    await self._settle_last_round(cchan, round_id)
                    self.finished = True
                else:
                    await self._run_round(cchan, qchan, round_id)
        finally:
            cdone.set()
            qdone.set()
            await cchan.close()
            await qchan.close()

    async def _reconcile_pools(self, cchan: TcpChannel) -> None:
        """Both ends say whether they hold an authentication pool (``link.hello``).

        After a ``pki``/``pgp`` bootstrap whose last message was lost, one end holds a pool the other
        never seeded. A pool that has authenticated no round yet is then discarded (with the bootstrap
        round's pending key) and the link bootstraps again; a forged hello can cause no more than that
        (a new signature-authenticated bootstrap). A pool that has authenticated rounds is never
        discarded: the peer then lost its state, and the link is refused until an operator intervenes.
        """
        mine = self.pool is not None
        if self.transmitter:
            await cchan.send("link.hello", pool=mine)
            theirs = bool((await recv_fresh(cchan, "link.hello"))["pool"])
        else:
            theirs = bool((await recv_fresh(cchan, "link.hello"))["pool"])
            await cchan.send("link.hello", pool=mine)
        if self.pool is None or theirs:
            return
        if self.cfg.auth.bootstrap == "psk" or self.pool.report()["rounds_authenticated"] > 0:
            raise AuthenticationError(
                f"the peer {self.site.peer} says it holds no authentication pool for link {self.link_id}, but this "
                "end's pool is established (pre-shared, or rounds were authenticated with it) and is never "
                "discarded: the peer lost its state (a new bootstrap needs the operator) or the message was forged"
            )
        log.warning("%s: the peer never completed the bootstrap; discarding the unused pool and bootstrapping "
                    "again", self.site.name)
        self.pool = None
        for path in (self.pool_path, self.pending_dir / f"{BOOTSTRAP_ROUND_ID}.json"):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()

    async def _settle_last_round(self, cchan: TcpChannel, round_id: int) -> None:
        """After the last round, an empty authenticated round commits the last round's key at both ends."""
        if self.pool is None:
            return
        result = await authenticate_peer(cchan, self.pool, self.role, round_id)
        self.stats.auth_bits_consumed += result.consumed_bits
        await self._release_settled(result)
        await self.write_status()

    async def _release_settled(self, result: RoundOutcome) -> None:
        """Store the keys of rounds both ends now hold; delete those the peer never accepted.

        Called only after a verified Wegman–Carter exchange, which also proves that the peer holds the
        pool seeded by the bootstrap round: that round's pending key is committed here too.
        """
        for rid in result.dropped_round_ids:
            with contextlib.suppress(FileNotFoundError):
                (self.pending_dir / f"{rid}.json").unlink()
        for rid in (BOOTSTRAP_ROUND_ID, *result.committed_round_ids):
            path = self.pending_dir / f"{rid}.json"
            if path.exists():
                doc = json.loads(path.read_text())
                await self._store(rid, doc["block_id"], bytes.fromhex(doc["key"]))
                path.unlink()

    async def _rounds_loop(self) -> None:
        while not self.stop.is_set() and not self.finished:
            try:
                await self._session()
            except _Stopped:
                break
            except KeyPoolExhausted as exc:
                log.error("%s: %s; stopping the link rather than weakening authentication", self.site.name, exc)
                self.stats.aborts.append(f"authentication: {exc}")
                await self.write_status()
                self.stop.set()
            except (ChannelError, AuthenticationError, PeerAbort) as exc:
                self.stats.reconnections += 1
                self.stats.aborts.append(f"link: {exc}")
                log.warning("%s: link to %s lost or refused (%s); reconnecting", self.site.name, self.site.peer, exc)
                await self.write_status()
                await asyncio.sleep(0.2)
        if not self.finished:
            self.stop.set()

    async def _kms_link_loop(self) -> None:
        assert self.kme is not None
        while not self.stop.is_set():
            if not self.link_keys:
                self.link_keys_changed.clear()
                await self.link_keys_changed.wait()
                continue
            link = None
            done = asyncio.Event()
            try:
                channel, done = await self._open("kms", self.cfg.link.kms)
                link = KmsPeerLink(channel, self.transmitter,
                                   lambda msg: self.kme.handle_peer(self.site.peer, msg))  # type: ignore[union-attr]
                await link.handshake(self.link_keys)
                await self.kme.attach_peer(link)
                log.info("%s: KME peer link to %s up", self.site.name, self.site.peer)
                await link.closed.wait()
            except (ChannelError, AuthenticationError) as exc:
                log.warning("%s: KME peer link: %s", self.site.name, exc)
                await asyncio.sleep(0.5)
            finally:
                self.kme.detach_peer()
                done.set()
                if link is not None:
                    await link.close()

    async def run(self) -> None:
        """Run until stopped (``self.stop``) or until the configured number of rounds is done."""
        self._load_state()
        kms_cfg = self.cfg.kms
        store_path = kms_cfg.store
        if store_path.startswith("sqlite:///") and not Path(store_path.removeprefix("sqlite:///")).is_absolute():
            store_path = "sqlite:///" + str(self.cfg.resolve(store_path.removeprefix("sqlite:///")))
        store = open_store(
            store_path,
            chunk_bits=kms_cfg.key_size_bits,
            limits=LinkLimits(kms_cfg.capacity_keys, kms_cfg.high_water_keys, kms_cfg.low_water_keys),
        )
        self.kme = KME(
            KMEConfig(kme_id=self.site.name, peer_kme_id=self.site.peer, sae_ids=frozenset(kms_cfg.sae_ids),
                      key_size=kms_cfg.key_size_bits),
            store,
        )
        servers: list[asyncio.Server] = []
        if not self.transmitter:
            for name in ("classical", "quantum", "kms"):
                servers.append(await self._listen(name, getattr(self.cfg.link, name)))
        async with contextlib.AsyncExitStack() as stack:
            if kms_cfg.tls_cert:
                host, port = parse_address("kms", "etsi_listen", kms_cfg.etsi_listen)
                tls = TLSFiles(self.cfg.resolve(kms_cfg.tls_cert), self.cfg.resolve(kms_cfg.tls_key),
                               self.cfg.resolve(kms_cfg.ca_cert),
                               self.cfg.resolve(kms_cfg.crl) if kms_cfg.crl else None)
                running = await stack.enter_async_context(serve_etsi014(self.kme, host, port, tls))
                self.etsi_url = running.url
                log.info("%s: ETSI GS QKD 014 server at %s", self.site.name, running.url)
            if kms_cfg.local_socket:
                await stack.enter_async_context(
                    serve_local(self.kme, self.cfg.resolve(kms_cfg.local_socket), kms_cfg.local_uid_map())
                )
            await self.write_status()
            kms_task = asyncio.create_task(self._kms_link_loop())
            try:
                await self._rounds_loop()
                await self.write_status()
                if self.finished:
                    await self.stop.wait()  # keep serving keys (ETSI 014, peer link) until stopped
            finally:
                kms_task.cancel()
                with contextlib.suppress(BaseException):
                    await kms_task
                for server in servers:
                    server.close()
                await self.write_status()  # before the store closes: the status reads its levels
                await self.kme.close()
                store.close()


class _Stopped(Exception):
    """The node was asked to stop while it waited for its peer to connect."""


def _key_bytes(block: KeyBlock) -> bytes:
    """The round key as whole bytes (the last partial byte, if any, is dropped)."""
    return block.key.to_bytes()[: block.length // 8]
