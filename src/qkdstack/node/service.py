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
import secrets
import signal
import threading
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qkdstack.auth.bootstrap import BOOTSTRAP_ROUND_ID, DEFAULT_SEED_BYTES, begin_bootstrap_round
from qkdstack.auth.pool import AuthKeyPool, RoundOutcome
from qkdstack.auth.psk import consume_psk, load_psk, pool_from_psk, psk_check
from qkdstack.auth.session import authenticate_peer, begin_round
from qkdstack.certs import atomic_write
from qkdstack.errors import (
    AuthenticationError,
    ChannelError,
    ConfigError,
    KeyPoolExhausted,
    PeerAbort,
    ProtocolAbort,
    QKDError,
)
from qkdstack.kms.etsi014 import TLSFiles, serve_etsi014
from qkdstack.kms.kme import KME, KMEConfig, key_proof
from qkdstack.kms.local import serve_local
from qkdstack.kms.store import KeyStoreError, LinkLimits, open_store
from qkdstack.node.config import NodeConfig, parse_address
from qkdstack.node.credentials import bootstrap_credentials, release_credentials
from qkdstack.node.kms_link import KmsPeerLink
from qkdstack.node.quantum import TransmitterRecord, recorded_frame, recv_light, send_light
from qkdstack.node.rate import RealTimeMeter
from qkdstack.ops.service import NodeOps
from qkdstack.physics.eve import parse_eve
from qkdstack.physics.recorded import RecordSource
from qkdstack.physics.split import Receiver, Transmitter
from qkdstack.protocol import round as distill
from qkdstack.protocol.keyblock import Abort, KeyBlock
from qkdstack.protocol.round import RoundConfig, recv_fresh
from qkdstack.transport.tcp import TcpChannel, connect, serve

log = logging.getLogger("qkdstack.node")

LINK_KEY_BYTES = 32
"""QKD key bytes per accepted round for the KME peer link's key ring."""
KEPT_LINK_KEYS = 4
RATE_LOG_INTERVAL_S = 30.0
"""How often (at most) the node logs its key rates and real-time factor."""


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
            reconciliation=config.protocol.reconciliation,
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
        # [device] source = "records": each site reads its own side's record of each frame (docs/devices.md).
        self.records = (RecordSource(config.resolve(config.device.records_dir), self.role, params.source.n_intensities)
                        if config.device.source == "records" else None)
        self.stats = NodeStats()
        self.pool: AuthKeyPool | None = None
        self.psk_path = config.resolve(config.auth.psk_file) if config.auth.bootstrap == "psk" else None
        self._rebootstrap = False
        """The peer never completed a signed bootstrap: run a new one, keeping our pool until it succeeds."""
        self._quantum_waiting: dict[Any, tuple[TcpChannel, asyncio.Event]] = {}
        """Receiver: quantum connections by session nonce, until their classical connection comes."""
        self._last_block_bits = 0
        self._frame_pulses = config.device.pulses_per_frame
        """Pulses of the frame of the round in flight (the device time it stands for)."""
        """Size of the last block this node stored: the room both stores must have before the next round."""
        self.kme: KME | None = None
        self.link_keys: dict[int, bytes] = {}
        self.link_keys_changed = asyncio.Event()
        self.stop = asyncio.Event()
        """Set (on the serving loop, e.g. by SIGTERM) to stop the node; it reaches the distillation loop too."""
        self._main_loop: asyncio.AbstractEventLoop | None = None
        """The serving loop: ETSI 014, in-unit delivery, the KME peer link, the key store."""
        self._dloop: asyncio.AbstractEventLoop | None = None
        """The distillation loop (its own thread): device frames, the classical link, rounds."""
        self._dstop: asyncio.Event | None = None
        self._dgo: asyncio.Event | None = None
        self.rtf = RealTimeMeter()
        self._last_rate_log = 0.0
        self.etsi_url: str | None = None
        self._status_task: asyncio.Future[None] | None = None
        self._status_again = False
        self._device_lock = threading.Lock()
        """Held by the worker thread that emits or detects a frame (one at a time per device half)."""
        self.skip_url: str | None = None
        self.ops: NodeOps | None = None
        self.status_doc: dict[str, Any] | None = None
        """The last status document written (what ``status.json`` holds); read by the metrics (qkdstack.ops)."""
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
            self._consume_seeding_psk()
            self._recover_pending()
        elif self.psk_path is not None:
            # Checked now (one sentence, exit 2, for a consumed, damaged or foreign PSK); the pool is seeded
            # only once the peer has shown the same PSK check value (_reconcile_pools).
            try:
                psk = load_psk(self.psk_path)
            except ConfigError as exc:
                raise ConfigError(f"[auth] psk_file: {exc}") from None
            if psk.link_id != self.link_id:
                raise ConfigError(
                    f"[auth] psk_file is for link {psk.link_id!r}, but this node serves link {self.link_id!r}"
                )
        keys_file = self.data_dir / "kms-link-keys.json"
        if keys_file.exists():
            self.link_keys = {int(r): bytes.fromhex(k) for r, k in json.loads(keys_file.read_text()).items()}

    def _consume_seeding_psk(self) -> None:
        """Erase the PSK the pool was seeded from, if a crash left it behind (a PSK seeds once, see auth/psk.py)."""
        if self.psk_path is None or self.pool is None or self.pool.seed_check is None or not self.psk_path.exists():
            return
        if psk_check(self.psk_path) == self.pool.seed_check:
            consume_psk(self.psk_path)

    def _seed_from_psk(self) -> None:
        """Seed the authentication pool from the PSK file, persist it, then consume the PSK."""
        assert self.psk_path is not None
        self.pool = pool_from_psk(self.psk_path, path=self.pool_path)
        consume_psk(self.psk_path)
        log.info("%s: authentication pool seeded from the pre-shared key (check %s); the key file is now consumed",
                 self.site.name, self.pool.seed_check)

    def _my_psk_check(self) -> str | None:
        """The check value of the PSK this end's pool was (or will be) seeded from; None without a PSK."""
        if self.pool is not None:
            return self.pool.seed_check
        return psk_check(self.psk_path) if self.psk_path is not None else None

    # ------------------------------------------------------------------------------ pending keys

    def _pending_path(self, round_id: int) -> Path:
        return self.pending_dir / f"{round_id}.json"

    def _write_pending(
        self, round_id: int, block_id: str, key: bytes, *, whole: bool = False, proof: dict[str, Any] | None = None
    ) -> None:
        """Keep a round's key aside (0600), with its proof, until both ends are known to hold it.

        ``whole``: the key still includes the pool's refill slice (written before the pool persists the
        round, so that a crash can never leave the pool ahead of the key; see :meth:`_recover_pending`).
        ``proof``: what the key store keeps with the block (:func:`~qkdstack.kms.kme.key_proof`).
        """
        doc = {"block_id": block_id, "key": key.hex(), "whole": whole, "proof": proof}
        atomic_write(self._pending_path(round_id), json.dumps(doc).encode(), 0o600)

    def _recover_pending(self) -> None:
        """After a restart, bring ``pending/`` in line with the pool (which is persisted after each file).

        A key written whole before its round verified loses the refill slice if the pool holds the round
        as pending, and is deleted if the pool never accepted it. A round the pool already committed is
        marked for storing (the crash came between the commit and the store).
        """
        assert self.pool is not None
        for path in sorted(self.pending_dir.glob("*.json")):
            rid = int(path.stem)
            doc = json.loads(path.read_text())
            state = self.pool.round_state(rid)
            if rid == BOOTSTRAP_ROUND_ID or doc.get("committed"):
                continue
            if state is None:
                log.warning("%s: round %d was never accepted here; its key is dropped", self.site.name, rid)
                path.unlink()
                continue
            if doc.get("whole"):
                refill = self.pool.pending_refill_bytes(rid)
                if refill is None:  # committed already, so it was cut before; cannot happen, keep it safe
                    log.error("%s: pending round %d has no known refill size; its key is dropped", self.site.name,
                              rid)
                    path.unlink()
                    continue
                self._write_pending(rid, doc["block_id"], bytes.fromhex(doc["key"])[refill:], proof=doc.get("proof"))
            if state == "committed":
                doc = json.loads(path.read_text())
                doc["committed"] = True
                atomic_write(path, json.dumps(doc).encode(), 0o600)

    def _save_link_keys(self) -> None:
        doc = {str(r): k.hex() for r, k in sorted(self.link_keys.items())[-KEPT_LINK_KEYS:]}
        atomic_write(self.data_dir / "kms-link-keys.json", json.dumps(doc).encode(), 0o600)

    async def write_status(self) -> None:
        store = None
        if self.kme is not None:
            counts = await self._on_main(self.kme.store.counts(self.kme.config.link_id))
            store = {"stored_keys": counts.stored, "key_size_bits": self.kme.config.key_size}
        now = time.time()
        elapsed = max(now - self.stats.started, 1e-9)
        doc = {
            "site": self.site.name,
            "role": self.site.role,
            "link": self.link_id,
            "updated": time.time(),
            "etsi014_url": self.etsi_url,
            "skip_url": self.skip_url,
            "metrics_url": self.ops.metrics_url if self.ops else None,
            "dashboard_url": self.ops.dashboard_url if self.ops else None,
            "finished": self.finished,
            "rounds_accepted": self.stats.rounds_accepted,
            "rounds_aborted": self.stats.rounds_aborted,
            "secret_bits": self.stats.secret_bits,
            "stored_bits": self.stats.stored_bits,
            "secret_key_rate_bit_per_s_wall": self.stats.secret_bits / elapsed,
            "secret_key_rate_bit_per_s_device": (
                self.stats.secret_bits / self.stats.pulses * self.params.source.rep_rate_hz if self.stats.pulses else 0
            ),
            "real_time_factor": self.rtf.factor(now),
            "real_time_window_s": self.rtf.window_s,
            "device_seconds_distilled": self.rtf.total_device_s,
            "auth_bits_consumed": self.stats.auth_bits_consumed,
            "auth_pool": self.pool.report() if self.pool is not None else None,
            "epsilon": _link_epsilon(self.pool),
            "device": self.cfg.device_labels,
            "store": store,
            "reconnections": self.stats.reconnections,
            "last_round": self.stats.last,
            "recent_aborts": self.stats.aborts[-5:],
        }
        self.status_doc = doc
        data = json.dumps(doc, indent=1, default=str).encode()
        if self._in_distillation():  # the file's fsync on a worker thread, not on the distillation loop
            await asyncio.to_thread(atomic_write, self.data_dir / "status.json", data, 0o600)
        else:
            atomic_write(self.data_dir / "status.json", data, 0o600)

    def _status_soon(self) -> None:
        """Write status.json in the background, coalescing writes: a status file is off a round's critical path.

        The next round starts at once; one writer task at a time writes the latest state (again, if
        rounds ended while it wrote). Fatal paths and the stop still write synchronously.
        """
        if self._status_task is not None and not self._status_task.done():
            self._status_again = True
            return

        async def writer() -> None:
            while True:
                self._status_again = False
                try:
                    await self.write_status()
                except (OSError, QKDError) as exc:  # a status file is not worth stopping the node for
                    log.error("%s: status.json not written: %s", self.site.name, exc)
                if not self._status_again:
                    return

        self._status_task = asyncio.ensure_future(writer())

    async def _status_flushed(self) -> None:
        """Wait for a background status write in flight, if any."""
        if self._status_task is not None:
            with contextlib.suppress(Exception):
                await self._status_task

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

            def failed(attempt: int, exc: OSError) -> None:  # the first, then one line a minute (max_delay 1 s)
                if attempt == 1 or attempt % 60 == 0:
                    log.info("%s: %s link to %s at %s: attempt %d failed (%s); retrying every second",
                             self.site.name, name, self.site.peer, address, attempt, exc.strerror or type(exc).__name__)

            log.info("%s: connecting the %s link to %s at %s", self.site.name, name, self.site.peer, address)
            opening = connect(host, port, attempts=1_000_000, max_delay=1.0, timeout=self.cfg.link.timeout_s,
                              on_failure=failed)
        else:
            opening = self._accepted[name].get()
        # Waiting for the peer must not outlive a stop request (a round in flight is still finished).
        task = asyncio.ensure_future(opening)
        stopping = asyncio.ensure_future(self._stopping().wait())
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

    async def _agree_round_id(self, channel: TcpChannel, final: bool = False) -> tuple[int, bool, bool]:
        """Agree the next round: ``(round_id, final, room)``.

        Both ends use one more than the larger of their last round IDs (bound into the transcript MAC).
        The transmitter also says whether this is the final, settling round (``final``): the receiver
        follows its decision, so the two ends never disagree about when to stop. Each end says whether
        its key store has room for another block (``room``); a round runs only if both have, so a block
        is never made that one site cannot store. While either is full the transmitter asks again every
        half second, which also keeps the session's connections alive.
        """
        mine = self.pool.last_round_id if self.pool is not None else 0
        room = await self._on_main(self._store_has_room())
        if self.transmitter:
            await channel.send("link.next", last=mine, final=final, room=room)
            msg = await recv_fresh(channel, "link.next")
        else:
            msg = await recv_fresh(channel, "link.next")
            final = bool(msg["final"])
            await channel.send("link.next", last=mine, final=final, room=room)
        return max(mine, int(msg["last"])) + 1, final, room and bool(msg.fields.get("room", True))

    async def _store_has_room(self) -> bool:
        """Whether this site's key store is below its high-water mark and can take a block as large as the last."""
        if self.kme is None:
            return True
        return not await self.kme.is_full() and await self.kme.can_store(self._last_block_bits)

    async def _device_frame(self, qchan: TcpChannel) -> Any:
        if self.records is not None:
            self._frame_id, record = await recorded_frame(qchan, self.records, self._stopping())
            return record
        n = self.cfg.device.pulses_per_frame
        if self.transmitter:
            assert self.tx is not None
            light, record = await asyncio.to_thread(self._emit, n)
            self._frame_id += 1
            await send_light(qchan, light, self._frame_id)
            return record
        assert self.rx is not None
        self._frame_id, light = await recv_light(qchan)
        return await asyncio.to_thread(self._detect, light)

    def _emit(self, n: int) -> tuple[Any, TransmitterRecord]:
        """Worker thread: emit a frame and take Alice's record of it (the record holds that frame)."""
        assert self.tx is not None
        with self._device_lock:
            light = self.tx.emit(n)
            return light, TransmitterRecord(self.tx, n)

    def _detect(self, light: Any) -> Any:
        """Worker thread: Bob's detection of one frame's light."""
        assert self.rx is not None
        with self._device_lock:
            return self.rx.detect(light)

    async def _run_round(self, cchan: TcpChannel, qchan: TcpChannel, round_id: int,
                         frames: _FramePipeline | None = None) -> None:
        record = await (frames.next() if frames is not None else self._device_frame(qchan))
        self._frame_pulses = record.n_pulses  # a recorded frame may differ from the configured size
        self.stats.pulses += record.n_pulses
        party = distill.alice if self.transmitter else distill.bob
        if self.pool is None or self._rebootstrap:
            await self._bootstrap_round(cchan, record, party)
            return
        auth = await begin_round(cchan, self.pool, self.role, round_id)
        outcome = await party(cchan, record, self.round_config)
        if isinstance(outcome, Abort):
            auth.abandon()
            await self._aborted(outcome.stage, outcome.reason, outcome.block_id)
            return
        key = _key_bytes(outcome)
        # Written before finish() persists the pool: a crash in between can leave a key without a pool
        # entry (dropped on restart), never a pool entry without its key.
        self._write_pending(round_id, outcome.block_id, key, whole=True, proof=key_proof(outcome.to_dict()))
        _crash_point("round-key-aside")
        try:
            result = await auth.finish(key, key_epsilon=outcome.eps_sec,
                                       block_epsilon=outcome.eps_sec + outcome.eps_cor)
        except (AuthenticationError, PeerAbort) as exc:
            self._pending_path(round_id).unlink(missing_ok=True)
            await self._aborted("authentication", str(exc), outcome.block_id)
            return
        except BaseException:
            self._pending_path(round_id).unlink(missing_ok=True)
            raise
        self.stats.auth_bits_consumed += result.consumed_bits
        _crash_point("round-verified")
        await self._settle(outcome, result)

    async def _bootstrap_round(self, cchan: TcpChannel, record: Any, party: Any) -> None:
        try:
            await self._bootstrap_round_signed(cchan, record, party)
        finally:
            await asyncio.to_thread(release_credentials, self.cfg)  # GnuPG's agent must not outlive the round

    async def _bootstrap_round_signed(self, cchan: TcpChannel, record: Any, party: Any) -> None:
        signer, verifier = bootstrap_credentials(self.cfg)
        boot = await begin_bootstrap_round(cchan, self.role, self.link_id, self.site.name)
        outcome = await party(cchan, record, self.round_config)
        if isinstance(outcome, Abort):
            boot.abandon()
            await self._aborted(outcome.stage, outcome.reason, outcome.block_id)
            return
        key = _key_bytes(outcome)
        previous = self._pending_path(BOOTSTRAP_ROUND_ID)
        kept = previous.read_bytes() if previous.exists() else None
        # Written before finish() seeds and persists the pool (the first seed_bytes seed it, the rest is key).
        self._write_pending(BOOTSTRAP_ROUND_ID, outcome.block_id, key[DEFAULT_SEED_BYTES:])
        try:
            pool, _ = await boot.finish(signer, verifier, key, path=self.pool_path,
                                           seed_epsilon=outcome.eps_sec)
        except BaseException as exc:
            if kept is None:  # a failed bootstrap leaves the previous one's key as it was
                previous.unlink(missing_ok=True)
            else:
                atomic_write(previous, kept, 0o600)
            if not isinstance(exc, (AuthenticationError, PeerAbort)):
                raise
            await self._aborted("authentication", f"bootstrap refused: {exc}", outcome.block_id)
            return
        self.pool = pool
        self._rebootstrap = False
        log.info("%s: bootstrap by %s succeeded; authentication pool seeded from round %s",
                 self.site.name, self.cfg.auth.bootstrap, outcome.block_id[:8])
        # Pending until the first Wegman-Carter exchange verifies: only that proves the peer seeded its pool
        # from this round too (the last bootstrap message may be lost), see _release_settled.
        proof = self._count_accepted(outcome, None)
        self._write_pending(BOOTSTRAP_ROUND_ID, outcome.block_id, key[DEFAULT_SEED_BYTES:], proof=proof)
        self._status_soon()

    async def _settle(self, block: KeyBlock, result: RoundOutcome) -> None:
        """Keep the round's key pending on disk (without the refill slice); store what earlier rounds allow."""
        proof = self._count_accepted(block, result)
        self._write_pending(result.round_id, block.block_id, result.key_for_store, proof=proof)
        await self._release_settled(result)
        self._status_soon()

    async def _store(self, round_id: int, block_id: str, key: bytes, proof: dict[str, Any] | None = None) -> None:
        link_key, rest = key[:LINK_KEY_BYTES], key[LINK_KEY_BYTES:]
        if len(link_key) == LINK_KEY_BYTES:
            self.link_keys[round_id] = link_key
            for old in sorted(self.link_keys)[:-KEPT_LINK_KEYS]:  # as many as the file keeps: memory stays flat
                del self.link_keys[old]
            self._save_link_keys()
            self.link_keys_changed.set()
        if self.kme is not None and rest:
            chunks = await self.kme.add_block(block_id, rest, proof=proof)
            self.stats.stored_bits += chunks * self.kme.config.key_size
            self._last_block_bits = 8 * len(rest)

    def _count_accepted(self, block: KeyBlock, result: RoundOutcome | None) -> dict[str, Any]:
        """Count an accepted round, record (and log) its figures and its proof; returns the proof to store.

        The proof gains the device's labels and the composed ε of the block: ε_sec + ε_cor + the round's
        authentication error (its tags' forgery bound plus ε′ of the keys they used; for a signed
        bootstrap round, the signatures' own error is not quantified and not included).
        """
        self.stats.rounds_accepted += 1
        self.stats.secret_bits += block.length
        self.rtf.add(self._frame_pulses / self.params.source.rep_rate_hz)
        auth_eps = result.epsilon if result else 0.0
        block = block.with_provenance(
            device=self.cfg.device_labels,
            authentication={
                "method": "wegman-carter" if result else self.cfg.auth.bootstrap,
                "epsilon": auth_eps,
                "epsilon_mac": result.epsilon_mac if result else None,
                "epsilon_key": result.epsilon_key if result else None,
            },
            epsilon_composed=block.eps_sec + block.eps_cor + auth_eps,
        )
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
            "epsilon_composed": meta["provenance"]["epsilon_composed"],
            "stage_seconds": block.stage_seconds,
            "detections": block.stats.get("detections"),
        }
        self._log_round({**self.stats.last, "proof": meta})
        pool = self.pool.report().get("balance_bits") if self.pool is not None else None
        stored = ((self.status_doc or {}).get("store") or {}).get("stored_keys")
        log.info("%s: round %s with %s accepted: QBER %.2f %% (key basis), %d secret bits; key store %s keys "
                 "(at the last status), authentication pool %s bits", self.site.name, block.block_id,
                 self.site.peer, 100 * block.qber_key, block.length, "?" if stored is None else stored,
                 "?" if pool is None else pool)
        self._rate_log()
        return key_proof(meta)  # stored with the block's keys (kms/kme.py)

    def _rate_log(self, *, force: bool = False) -> None:
        """Log the key rates and the real-time factor, at most every RATE_LOG_INTERVAL_S (and at the end)."""
        now = time.time()
        if not force and now - self._last_rate_log < RATE_LOG_INTERVAL_S:
            return
        if not self.stats.rounds_accepted:
            return
        self._last_rate_log = now
        wall = self.stats.secret_bits / max(now - self.stats.started, 1e-9)
        device = self.stats.secret_bits / self.stats.pulses * self.params.source.rep_rate_hz if self.stats.pulses else 0
        log.info("%s: %d rounds accepted, %d aborted; secret key rate %.4g bit/s of wall time, %.4g bit/s of device "
                 "time; real-time factor %.3f (device seconds distilled per wall second, last %.0f s)",
                 self.site.name, self.stats.rounds_accepted, self.stats.rounds_aborted, wall, device,
                 self.rtf.factor(now), self.rtf.window_s)

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
        self._status_soon()

    # ---------------------------------------------------------------------------------- loops

    def _in_distillation(self) -> bool:
        """Whether the caller runs on the distillation loop (its thread)."""
        try:
            return self._dloop is not None and asyncio.get_running_loop() is self._dloop
        except RuntimeError:
            return False

    def _stopping(self) -> asyncio.Event:
        """The stop event of the running loop (an asyncio.Event belongs to one loop)."""
        if self._dstop is not None and self._in_distillation():
            return self._dstop
        return self.stop

    def _request_stop(self) -> None:
        """Stop the node from either loop: both loops' stop events are set."""
        self._stopping().set()
        main = self._main_loop
        if main is not None and self._in_distillation():
            with contextlib.suppress(RuntimeError):  # the serving loop is already closed
                main.call_soon_threadsafe(self.stop.set)

    async def _on_main(self, coro: Coroutine[Any, Any, Any]) -> Any:
        """Run ``coro`` on the serving loop and wait for its result from whichever loop calls.

        The KME, its key store (whose SQLite batches run on the serving loop's thread, kms/store.py) and
        the KME peer link's key ring belong to the serving loop; the distillation loop reaches them only
        through here (``asyncio.run_coroutine_threadsafe``), never directly.
        """
        main = self._main_loop
        if main is None or not self._in_distillation():
            return await coro
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, main))

    async def _distillation_main(self, started: Callable[[BaseException | None], None]) -> None:
        """The distillation loop's body: listen for the classical and quantum links, then run sessions."""
        self._dloop = asyncio.get_running_loop()
        self._dstop = asyncio.Event()
        self._dgo = asyncio.Event()
        if self.stop.is_set():  # asked to stop before this loop existed (a plain flag read across threads)
            self._dstop.set()
            self._dgo.set()
        servers: list[asyncio.Server] = []
        try:
            if not self.transmitter:
                for name in ("classical", "quantum"):
                    servers.append(await self._listen(name, getattr(self.cfg.link, name)))
        except BaseException as exc:
            for server in servers:
                server.close()
            started(exc)
            return
        started(None)
        try:
            await self._dgo.wait()  # set by go(), or on stop (the rounds loop then ends at once)
            await self._rounds_loop()
        finally:
            await self._status_flushed()
            for server in servers:
                server.close()
            self._rate_log(force=True)

    def _rounds_done(self) -> bool:
        """The transmitter's decision that the configured number of rounds is done."""
        limit = self.cfg.protocol.rounds
        return bool(limit) and self.stats.rounds_accepted + self.stats.rounds_aborted >= limit

    async def _session(self) -> None:
        """One pair of classical + quantum connections: entity authentication, then rounds."""
        cchan, cdone, qchan, qdone = await self._open_session()
        frames = _FramePipeline(self, qchan)
        try:
            await self._reconcile_pools(cchan)
            if self.pool is not None and not self._rebootstrap:
                round_id, _, _ = await self._agree_round_id(cchan)
                result = await authenticate_peer(cchan, self.pool, self.role, round_id)
                self.stats.auth_bits_consumed += result.consumed_bits
                await self._release_settled(result)
                log.info("%s: peer %s authenticated (round %d, %d key bits)", self.site.name, self.site.peer,
                         round_id, result.consumed_bits)
            if not self.stats.rounds_accepted:  # the real-time factor counts from the first session on
                self.rtf.restart()
            while not self._stopping().is_set() and not self.finished:
                round_id, final, room = await self._agree_round_id(
                    cchan, final=self.transmitter and self._rounds_done()
                )
                if final:
                    await self._settle_last_round(cchan, round_id)
                    self.finished = True
                elif room:
                    await self._run_round(cchan, qchan, round_id, frames)
                elif self.transmitter:
                    # A store is full: pause key generation but keep the session (the next link.next is its
                    # traffic; a new session would cost an entity authentication, 256 pool bits).
                    await asyncio.sleep(min(0.5, self.cfg.link.timeout_s / 4))
        finally:
            await frames.close()
            cdone.set()
            qdone.set()
            await cchan.close()
            await qchan.close()

    async def _open_session(self) -> tuple[TcpChannel, asyncio.Event, TcpChannel, asyncio.Event]:
        """Open a session's classical and quantum connections, paired by a fresh session nonce.

        The receiver accepts the two kinds on separate ports, so a quantum connection left over from a
        failed attempt could otherwise pair with a later session's classical one (every round would then
        abort at 50 % QBER, for good). The transmitter sends one nonce first on both connections; the
        receiver keeps quantum connections by nonce and takes the one that matches its classical
        connection's (the others are closed once more than a few wait, oldest first).
        """
        cchan, cdone = await self._open("classical", self.cfg.link.classical)
        try:
            if self.transmitter:
                qchan, qdone = await self._open("quantum", self.cfg.link.quantum)
                nonce = secrets.token_bytes(16)
                await cchan.send("link.session", nonce=nonce)
                await qchan.send("link.session", nonce=nonce)
                return cchan, cdone, qchan, qdone
            nonce = (await cchan.recv("link.session"))["nonce"]
            try:
                async with asyncio.timeout(self.cfg.link.timeout_s):
                    await self._await_quantum(nonce)
            except TimeoutError:
                raise ChannelError("the quantum-channel connection of this session did not come") from None
            qchan, qdone = self._quantum_waiting.pop(nonce)
            return cchan, cdone, qchan, qdone
        except BaseException:
            cdone.set()
            await cchan.close()
            raise

    async def _await_quantum(self, nonce: Any) -> None:
        """Receiver: accept quantum connections, filed by their session nonce, until ``nonce``'s is there."""
        while nonce not in self._quantum_waiting:
            qchan, qdone = await self._open("quantum", self.cfg.link.quantum)
            try:
                theirs = (await qchan.recv("link.session"))["nonce"]
            except ChannelError:
                qdone.set()
                await qchan.close()
                continue
            self._quantum_waiting[theirs] = (qchan, qdone)
            while len(self._quantum_waiting) > 4:
                old_chan, old_done = self._quantum_waiting.pop(next(iter(self._quantum_waiting)))
                old_done.set()
                await old_chan.close()

    async def _reconcile_pools(self, cchan: TcpChannel) -> None:
        """Both ends say whether they hold an authentication pool, and which PSK seeds it (``link.hello``).

        The hello is not authenticated, so nothing in it may cost key material or discard state:

        * ``psk``: the ends compare their PSK check values (public, independent of the key: auth/psk.py).
          Different values mean different pre-shared keys: refused before any key is used. A node without
          a pool seeds it from its (unconsumed) PSK only now; the lockstep check of the first authenticated
          exchange refuses a peer whose pool is in another state.
        * ``pki``/``pgp``: after a bootstrap whose last message was lost, one end holds a pool the other
          never seeded. If ours has authenticated no round, the link bootstraps again, but our pool is
          kept until a new signed bootstrap succeeds, so a forged hello costs at most a refused round (it
          cannot make one end drop a pool the other keeps). A pool that has authenticated rounds is never
          given up on the peer's word: the peer lost its state, and the link is refused until an operator
          intervenes.
        """
        mine = {"pool": self.pool is not None, "psk_check": self._my_psk_check()}
        if self.transmitter:
            await cchan.send("link.hello", **mine)
            theirs = (await recv_fresh(cchan, "link.hello")).fields
        else:
            theirs = (await recv_fresh(cchan, "link.hello")).fields
            await cchan.send("link.hello", **mine)
        peer_pool, peer_check = bool(theirs.get("pool")), theirs.get("psk_check")
        if self.psk_path is not None:
            if mine["psk_check"] is not None and peer_check is not None and peer_check != mine["psk_check"]:
                raise AuthenticationError(
                    f"the two sites hold different pre-shared keys for link {self.link_id} (check value "
                    f"{mine['psk_check']} here, {peer_check} at {self.site.peer}); nothing was used: put the same "
                    "PSK file at both sites (or, if this site's pool is established, make a new PSK for both "
                    "sites and remove both auth-pool.json files, see docs/node.md)"
                )
            if self.pool is None:
                self._seed_from_psk()
            return
        self._rebootstrap = False
        if self.pool is None or peer_pool:
            return
        if self.pool.report()["rounds_authenticated"] > 0:
            raise AuthenticationError(
                f"the peer {self.site.peer} says it holds no authentication pool for link {self.link_id}, but this "
                "end's pool has authenticated rounds and is never discarded on the peer's word: the peer lost its "
                "state (a new bootstrap needs the operator, see docs/node.md) or the message was forged"
            )
        log.warning("%s: the peer has not completed the bootstrap; bootstrapping again (this end's unused pool is "
                    "kept until the new bootstrap succeeds)", self.site.name)
        self._rebootstrap = True

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
            self._pending_path(rid).unlink(missing_ok=True)
        for rid in (BOOTSTRAP_ROUND_ID, *result.committed_round_ids):
            path = self._pending_path(rid)
            if path.exists():
                doc = json.loads(path.read_text())
                doc["committed"] = True
                atomic_write(path, json.dumps(doc).encode(), 0o600)
        await self._store_committed()

    async def _store_committed(self) -> None:
        """Move every committed pending key into the key store; one the store refuses waits for the next try.

        The store refuses a block when it is full (or fails): the key stays in ``pending/`` marked committed
        and is stored after a later round, instead of stopping the node. Until then the peer may hold the
        block alone; its KME discards chunks this site does not know when a consumer asks for them.
        """
        for path in sorted(self.pending_dir.glob("*.json"), key=lambda p: int(p.stem)):
            doc = json.loads(path.read_text())
            if not doc.get("committed"):
                continue
            try:
                await self._on_main(
                    self._store(int(path.stem), doc["block_id"], bytes.fromhex(doc["key"]), doc.get("proof"))
                )
            except KeyStoreError as exc:
                log.error("%s: block %s cannot be stored yet (%s); kept in pending/ and retried after the next "
                          "round", self.site.name, doc["block_id"][:8], exc)
                return
            _crash_point("block-stored")
            path.unlink()

    async def _rounds_loop(self) -> None:
        """Sessions, one after another, until stopped or finished; the node outlives its peer and the network.

        A session ends on anything the peer or the network can cause: a lost, reset or silent connection
        (``ChannelError``; a round that aborted because its connection broke leaves the channel broken, so
        the next message ends the session), a refused authentication, a peer's abort outside a round, a
        malformed message (``ValueError``, ``TypeError``, ...). Each is logged and counted in
        ``reconnections``, and a new session starts after a back-off that doubles from 0.2 s to 5 s while
        sessions keep failing without an accepted round. Fatal conditions are raised, so ``qkdstack node``
        exits non-zero instead of 0: an exhausted authentication pool, a configuration error, a local
        failure (disk, key store) or a bug.
        """
        delay = 0.2
        while not self._stopping().is_set() and not self.finished:
            accepted = self.stats.rounds_accepted
            try:
                await self._session()
            except _Stopped:
                break
            except KeyPoolExhausted as exc:
                log.error("%s: %s; stopping the link rather than weakening authentication", self.site.name, exc)
                self.stats.aborts.append(f"authentication: {exc}")
                await self.write_status()
                self._request_stop()
                raise
            except ConfigError:
                raise
            except (ChannelError, AuthenticationError, ProtocolAbort, *_PEER_INPUT_ERRORS) as exc:
                self.stats.reconnections += 1
                self.stats.aborts.append(f"link: {exc}")
                if isinstance(exc, _PEER_INPUT_ERRORS):  # a malformed message, or a bug: keep the traceback
                    log.error("%s: session with %s failed (%s: %s); reconnecting", self.site.name, self.site.peer,
                              type(exc).__name__, exc, exc_info=exc)
                else:
                    log.warning("%s: link to %s lost or refused (%s); reconnecting", self.site.name,
                                self.site.peer, exc)
                await self.write_status()
                if self.stats.rounds_accepted > accepted:
                    delay = 0.2
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stopping().wait(), delay)
                delay = min(2 * delay, 5.0)
        if not self.finished:
            self._request_stop()

    async def _kms_link_loop(self) -> None:
        """Keep the KME peer link up for as long as the node runs.

        The link pings whenever it has been idle for a quarter of ``[link] timeout_s`` (at most 15 s), so
        neither end's read timeout closes it between requests, and a ping left unanswered closes it, so it
        reconnects before an SAE's request finds it dead. Any failure of one connection (lost or reset,
        refused handshake, the peer KME not answering in time, malformed peer data) is logged and retried
        after 0.5 s: this task must never end early, or key delivery would stop while generation goes on.
        """
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
                                   lambda msg: self.kme.handle_peer(self.site.peer, msg),  # type: ignore[union-attr]
                                   keepalive_s=min(self.cfg.link.timeout_s / 4, 15.0))
                await link.handshake(self.link_keys)
                await self.kme.attach_peer(link)
                log.info("%s: KME peer link to %s up", self.site.name, self.site.peer)
                await link.closed.wait()
            except _Stopped:
                return
            except (QKDError, OSError, TimeoutError, *_PEER_INPUT_ERRORS) as exc:
                log.warning("%s: KME peer link: %s: %s", self.site.name, type(exc).__name__, exc)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.stop.wait(), 0.5)
            finally:
                self.kme.detach_peer()
                done.set()
                if link is not None:
                    await link.close()

    async def run(self) -> None:
        """Run a one-link site until stopped (``self.stop``) or until the configured number of rounds is done.

        The node owns the site's key store, KME, consumer servers (ETSI 014, SKIP, in-unit) and
        operations listener. In a multi-link site (:mod:`qkdstack.node.site`) the site owns those, and
        each link runs :meth:`run_in_site` instead.
        """
        self._load_state()
        kms_cfg = self.cfg.kms
        store = open_site_store(self.cfg)
        self.kme = KME(
            KMEConfig(kme_id=self.site.name, peer_kme_id=self.site.peer, sae_ids=frozenset(kms_cfg.sae_ids),
                      key_size=kms_cfg.key_size_bits),
            store,
        )
        try:
            self.ops = NodeOps(self.cfg, lambda: self.status_doc).start()  # metrics, dashboard ([admin] listen)
            async with contextlib.AsyncExitStack() as stack:
                urls = await serve_consumers(stack, self.cfg, self.kme, self.ops)
                self.etsi_url, self.skip_url = urls.etsi_url, urls.skip_url
                await self._run_link()
        finally:
            if self.ops is not None:
                self.ops.stop()
            await self.kme.close()
            store.close()

    async def run_in_site(self, kme: KME) -> None:
        """Run this link inside a multi-link site, on the site's KME for this link (its store is the site's)."""
        self._load_state()
        self.kme = kme
        await self._run_link()

    async def _run_link(self) -> None:
        """The link itself: the distillation thread (rounds) and the KME peer link, until stopped.

        The receiver's KME peer link and its classical and quantum links listen from the start, so a
        transmitter finds them; no round starts before the KME serves (``go()`` below).
        """
        assert self.kme is not None
        self._main_loop = asyncio.get_running_loop()
        servers: list[asyncio.Server] = []
        distillation = _DistillationThread(self)
        try:
            if not self.transmitter:
                servers.append(await self._listen("kms", self.cfg.link.kms))
            await distillation.start()
            await self.write_status()
            for caveat in self.cfg.key_caveats:  # keys from a simulated device are not secret: say so at start
                log.warning("%s: %s", self.site.name, caveat)
            kms_task = asyncio.create_task(self._kms_link_loop())
            try:
                distillation.go()
                await distillation.wait()
                await self.write_status()
                if self.finished:
                    await self.stop.wait()  # keep serving keys (ETSI 014, peer link) until stopped
            finally:
                await distillation.shutdown()
                kms_task.cancel()
                with contextlib.suppress(BaseException):
                    await kms_task
        finally:
            await distillation.shutdown()
            for server in servers:
                server.close()
            await self.write_status()  # before the store closes: the status reads its levels


@dataclass
class ConsumerURLs:
    """Where a site's consumer servers listen (for ``status.json``)."""

    etsi_url: str | None = None
    skip_url: str | None = None


def open_site_store(cfg: NodeConfig) -> Any:
    """The site's key store from ``[kms]`` (a relative SQLite path is relative to the configuration file)."""
    kms_cfg = cfg.kms
    store_path = kms_cfg.store
    if store_path.startswith("sqlite:///") and not Path(store_path.removeprefix("sqlite:///")).is_absolute():
        store_path = "sqlite:///" + str(cfg.resolve(store_path.removeprefix("sqlite:///")))
    return open_store(
        store_path,
        chunk_bits=kms_cfg.key_size_bits,
        limits=LinkLimits(kms_cfg.capacity_keys, kms_cfg.high_water_keys, kms_cfg.low_water_keys),
    )


async def serve_consumers(stack: contextlib.AsyncExitStack, cfg: NodeConfig, kme: Any,
                          ops: NodeOps | None) -> ConsumerURLs:
    """Start the site's key delivery servers on ``kme`` (a link's KME, or a site's ``SiteKME``).

    ETSI 014 over mutual TLS (``[kms] tls_cert``), the SKIP key provider on the same TLS files
    (``[kms] skip_listen``) and in-unit delivery (``[kms] local_socket``); they stop with ``stack``.
    """
    kms_cfg = cfg.kms
    site = cfg.site.name
    urls = ConsumerURLs()
    if kms_cfg.tls_cert:
        host, port = parse_address("kms", "etsi_listen", kms_cfg.etsi_listen)
        tls = TLSFiles(cfg.resolve(kms_cfg.tls_cert), cfg.resolve(kms_cfg.tls_key), cfg.resolve(kms_cfg.ca_cert),
                       cfg.resolve(kms_cfg.crl) if kms_cfg.crl else None)
        running = await stack.enter_async_context(serve_etsi014(
            kme, host, port, tls, middleware=ops.etsi014_middleware if ops else None))
        urls.etsi_url = running.url
        log.info("%s: ETSI GS QKD 014 server at %s", site, running.url)
        if kms_cfg.skip_listen:  # SKIP key provider (kms/skip.py) on the same KME and TLS files
            from qkdstack.kms.skip import load_psk_file, serve_skip

            psks = load_psk_file(cfg.resolve(kms_cfg.skip_psk_file)) if kms_cfg.skip_psk_file else None
            skip = await stack.enter_async_context(serve_skip(
                kme, *parse_address("kms", "skip_listen", kms_cfg.skip_listen), tls, psks=psks,
                observer=ops.skip_observer if ops else None))
            urls.skip_url = skip.address
            log.info("%s: SKIP key provider at %s", site, skip.address)
    if kms_cfg.local_socket:
        await stack.enter_async_context(serve_local(kme, cfg.resolve(kms_cfg.local_socket), kms_cfg.local_uid_map()))
    return urls


_PEER_INPUT_ERRORS = (ValueError, TypeError, KeyError, IndexError, AttributeError, OverflowError)
"""What a malformed message from the peer (or the network) can raise where fields are parsed."""


CRASH_POINT_ENV = "QKDSTACK_TEST_CRASH_AT"
"""Fault injection for the crash tests (tests/test_node_crash.py): the node kills itself with SIGKILL at the
named point when this environment variable names it. Points: ``round-key-aside`` (a round's key written to
pending/, the pool not yet updated), ``round-verified`` (the pool persisted the round, the pending key not
yet cut), ``block-stored`` (a committed block in the key store, its pending file not yet removed)."""


def _crash_point(name: str) -> None:
    if os.environ.get(CRASH_POINT_ENV) == name:
        os.kill(os.getpid(), signal.SIGKILL)


def _link_epsilon(pool: AuthKeyPool | None) -> dict[str, float] | None:
    """The link's running error total: key blocks (ε_sec + ε_cor each) plus every round's authentication."""
    if pool is None:
        return None
    rep = pool.report()
    return {
        "key_blocks": rep["epsilon_blocks_total"],
        "authentication": rep["epsilon_total"],
        "link_total": rep["epsilon_blocks_total"] + rep["epsilon_total"],
    }


class _FramePipeline:
    """Device frames made one ahead of the rounds that use them, within one session (issue 12).

    While round k is distilled, frame k+1 is emitted, carried over the quantum connection and
    detected (the device halves run on a worker thread, their Numba kernels without the GIL). At most
    one frame is made ahead: a new frame starts only when a round takes the previous one, so a
    transmitter whose rounds are slower than its device waits (back-pressure) and memory stays flat.
    Both ends make and use frames in the same order on one connection, so round k at both ends uses
    frame k; a session that ends drops the frame made ahead (at both ends, since both close it). An
    error of the device half or the quantum connection is raised by the round that takes the frame.
    """

    def __init__(self, node: Node, qchan: TcpChannel) -> None:
        self.node = node
        self.qchan = qchan
        self._ready: asyncio.Queue[Any] = asyncio.Queue(maxsize=1)
        self._credit = asyncio.Semaphore(1)
        self._task: asyncio.Task[None] | None = None

    def __repr__(self) -> str:
        return f"_FramePipeline(ready={self._ready.qsize()})"

    async def _produce(self) -> None:
        while True:
            await self._credit.acquire()
            try:
                item = await self.node._device_frame(self.qchan)
            except Exception as exc:  # handed to the round that takes the frame
                await self._ready.put(exc)
                return
            await self._ready.put(item)

    async def next(self) -> Any:
        """The next frame's record; the frame after it starts at once."""
        if self._task is None:
            self._task = asyncio.create_task(self._produce())
        item = await self._ready.get()
        if isinstance(item, BaseException):
            raise item
        self._credit.release()
        return item

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(BaseException):
                await self._task


class _DistillationThread:
    """The node's distillation loop on a thread of its own, driven from the serving loop.

    Device frames, the classical and quantum connections and the rounds (sifting, estimation, Cascade,
    verification, amplification) run on this loop, so that their CPU work never delays an ETSI 014
    answer, an in-unit delivery or the KME peer link, which keep the serving loop to themselves (issue
    11). The heavy kernels release the GIL (Numba ``nogil``), so both loops progress on two cores.
    ``node.stop`` (serving loop) reaches this loop through ``call_soon_threadsafe``; a round in flight
    is finished first, as before.
    """

    def __init__(self, node: Node) -> None:
        self.node = node
        self.thread: threading.Thread | None = None
        self._started: asyncio.Future[None] | None = None
        self._done: asyncio.Future[None] | None = None
        self._watcher: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Start the thread; return once it listens (a ConfigError of its listening is raised here)."""
        main = asyncio.get_running_loop()
        self._started, self._done = main.create_future(), main.create_future()
        factory = _loop_factory(main)

        def settle(fut: asyncio.Future[None], exc: BaseException | None) -> None:
            def set_it() -> None:
                if fut.done():
                    return
                if exc is None:
                    fut.set_result(None)
                else:
                    fut.set_exception(exc)

            with contextlib.suppress(RuntimeError):  # the serving loop is closed: nobody is waiting
                main.call_soon_threadsafe(set_it)

        def body() -> None:
            error: BaseException | None = None
            try:
                with asyncio.Runner(loop_factory=factory) as runner:
                    runner.run(self.node._distillation_main(lambda exc: settle(self._started, exc)))
            except BaseException as exc:  # handed to the serving loop, which raises it from Node.run
                error = exc
            settle(self._started, error)  # if it failed before listening
            settle(self._done, error)

        self.thread = threading.Thread(target=body, name=f"qkd-distill-{self.node.site.name}", daemon=True)
        self.thread.start()
        await asyncio.shield(self._started)
        self._watcher = asyncio.create_task(self._forward_stop())

    def _set(self, event: asyncio.Event | None) -> None:
        dloop = self.node._dloop
        if dloop is not None and event is not None:
            with contextlib.suppress(RuntimeError):  # the distillation loop has ended already
                dloop.call_soon_threadsafe(event.set)

    def go(self) -> None:
        """Let the rounds start (the KME is serving)."""
        self._set(self.node._dgo)

    async def _forward_stop(self) -> None:
        await self.node.stop.wait()
        self._set(self.node._dstop)
        self._set(self.node._dgo)

    async def wait(self) -> None:
        """Wait until the rounds loop ends (stopped, finished, or failed: its exception is raised here)."""
        assert self._done is not None
        await asyncio.shield(self._done)

    async def shutdown(self) -> None:
        """Stop the distillation loop and wait for its thread, keeping the serving loop running meanwhile."""
        if self._done is None or self.thread is None or (self._done.done() and not self.thread.is_alive()):
            return
        self.node.stop.set()
        # Forwarded here, not only by the watcher task: a cancelled node task (a test's teardown cancels every
        # task) may have cancelled the watcher before it ran, and the thread would then wait for ever.
        self._set(self.node._dstop)
        self._set(self.node._dgo)
        while not self._done.done():  # the thread may still call into this loop (key store) on its way out
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.shield(self._done)
        if self._watcher is not None:
            self._watcher.cancel()
        await asyncio.to_thread(self.thread.join)
        if not self._done.cancelled():
            self._done.exception()  # retrieved: raised by wait() already, if anyone waited


def _loop_factory(main: asyncio.AbstractEventLoop) -> Callable[[], asyncio.AbstractEventLoop]:
    """The distillation loop's kind: uvloop when the serving loop is uvloop (``qkdstack node``)."""
    if type(main).__module__.startswith("uvloop"):
        import uvloop

        return uvloop.new_event_loop
    return asyncio.new_event_loop


class _Stopped(Exception):
    """The node was asked to stop while it waited for its peer to connect."""


def _key_bytes(block: KeyBlock) -> bytes:
    """The round key as whole bytes (the last partial byte, if any, is dropped)."""
    return block.key.to_bytes()[: block.length // 8]
