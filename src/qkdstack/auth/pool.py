"""The authentication key pool: the key material Wegman–Carter tags consume, kept in lockstep at both ends.

Layout
------
Two *directions*, ``"a2b"`` (keys of the tags Alice sends and Bob verifies) and ``"b2a"``, use disjoint
key material. Each direction has two append-only byte *streams* with an absolute cursor:

* ``hash``: Poly1305 hash keys ``r`` (16 bytes each), taken only when a fresh key is needed;
* ``pad``: one-time pads ``s`` (16 bytes per tag).

Keeping hash keys and pads in separate streams means a byte never serves as a pad at one end and as
a hash key at the other, even while the two ends disagree. Material enters as *segments* (one per
accepted round, plus the bootstrap seed with round id 0) that are appended in round-id order, so
the same byte sits at the same absolute position at both ends.

Per round and direction the pool consumes one 16-byte pad (128 bits), plus a 16-byte hash key when
the key must be refreshed: after the bootstrap, after any failed verification (Portmann 2014: a
hash key is recycled only while no tag has failed), or whenever the ends disagree on it. In the
steady state a round costs 256 bits for both directions.

Lockstep without trust (the two-generals problem)
-------------------------------------------------
An end cannot know whether its peer accepted the last round (the last tag may be lost). So:

1. A round's refill is *pending* after the round verified locally; its bytes are not used yet.
2. At the start of each round both ends exchange their pool state (:meth:`AuthKeyPool.sync_state`:
   cursors, hash-key position, committed and pending round ids: public counters, no key bytes)
   inside the round's transcript, and both compute the same *merged view* with a symmetric rule:
   cursors = max of both (bounded by ``max_skip``), committed = union (a round one end committed
   the other holds as pending), pending = intersection, hash key refreshed unless both hold the
   same one. The round's keys are drawn from the merged view.
3. Only if the round's tags verify is the merged view persisted: the peer's sync message was then
   authentic, so both ends hold the same view; the pending rounds both hold become committed and
   this round's refill becomes pending. If the round fails, only the *burns* persist (cursors move
   past every byte used; a hash key that saw a failed verification is discarded).

Cursors only move forward, so no pad is ever used twice, whatever an attacker does to the sync
messages; tampering costs at most ``max_skip`` bytes and a hash key per round (denial of service,
which a man in the middle can always cause by dropping messages). The node learns from each
:class:`RoundOutcome` which earlier rounds became committed or were dropped, so it can commit or
drop those rounds' keys in the key store identically at both sites.

Once any QKD refill is committed, the rest of the bootstrap seed is skipped and hash keys taken from
it are discarded: a bootstrap secret that leaks afterwards is worthless to an attacker.

Persistence: a JSON document with hex key bytes, written atomically with mode 0600 to ``path`` (or
handed to a ``persist`` callback, e.g. for the key-store database) after every change, *before* any
tag computed from the change leaves the node.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qkdstack.auth.wegman_carter import A_TO_B, B_TO_A, DIRECTIONS, HASH_KEY_BYTES, PAD_BYTES
from qkdstack.certs import atomic_write
from qkdstack.errors import AuthenticationError, ConfigError, KeyPoolExhausted

KINDS = ("hash", "pad")
SEED_ROUND_ID = 0
_STATE_VERSION = 2
_TAIL = 16  # committed round ids exchanged in a sync message
MAX_PENDING = 4


@dataclass
class _Stream:
    """Bytes at absolute positions ``[total - len(data), total)``, all at or after ``cursor``.

    ``origins`` records where each appended segment starts and which key it came from:
    ``[start, round_id, epsilon]``, ``epsilon`` the distance of that key from uniform (ε_sec of the
    QKD block, 0 for a pre-shared key). Rounds charge the ε of every source they draw from
    (:meth:`sources`), the ε′ of Portmann's bound.
    """

    total: int = 0
    cursor: int = 0
    data: bytearray = field(default_factory=bytearray)
    origins: list[list[Any]] = field(default_factory=list)

    @property
    def balance(self) -> int:
        return max(0, self.total - self.cursor)

    def _trim(self) -> None:
        keep = self.balance
        if len(self.data) > keep:
            del self.data[: len(self.data) - keep]
        while len(self.origins) > 1 and self.origins[1][0] <= self.cursor:
            del self.origins[0]

    def append(self, b: bytes, round_id: int, epsilon: float) -> None:
        if b:
            self.origins.append([self.total, round_id, float(epsilon)])
        self.total += len(b)
        self.data += b
        self._trim()

    def sources(self, n: int) -> dict[int, float]:
        """The keys (round id -> ε) that the next ``n`` bytes at the cursor came from."""
        out: dict[int, float] = {}
        end = self.cursor + n
        for i, (start, rid, eps) in enumerate(self.origins):
            nxt = self.origins[i + 1][0] if i + 1 < len(self.origins) else self.total
            if start < end and nxt > self.cursor:
                out[int(rid)] = float(eps)
        return out

    def skip_to(self, pos: int) -> None:
        self.cursor = max(self.cursor, pos)
        self._trim()

    def take(self, n: int) -> tuple[int, bytes]:
        """Consume ``n`` bytes; returns (absolute position, bytes)."""
        if self.balance < n:
            raise KeyPoolExhausted("not enough key")  # replaced by a fuller message by the caller
        start = len(self.data) - self.balance
        pos = self.cursor
        out = bytes(self.data[start : start + n])
        self.cursor += n
        self._trim()
        return pos, out

    def to_json(self) -> dict[str, Any]:
        return {"total": self.total, "cursor": self.cursor, "data": self.data.hex(), "origins": self.origins}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> _Stream:
        origins = [[int(o[0]), int(o[1]), float(o[2])] for o in d["origins"]]
        return cls(int(d["total"]), int(d["cursor"]), bytearray.fromhex(d["data"]), origins)


@dataclass
class _Direction:
    hash: _Stream = field(default_factory=_Stream)
    pad: _Stream = field(default_factory=_Stream)
    r: bytes | None = None  # current Poly1305 hash key, or None when it must be refreshed
    r_index: int = -1  # absolute position of r in the hash stream; -1 = none
    r_sources: dict[int, float] = field(default_factory=dict)  # the keys r came from (round id -> ε)

    def stream(self, kind: str) -> _Stream:
        return self.hash if kind == "hash" else self.pad

    def __repr__(self) -> str:
        return f"_Direction(hash_balance={self.hash.balance}, pad_balance={self.pad.balance}, r_index={self.r_index})"


@dataclass
class _Segment:
    round_id: int
    parts: dict[str, dict[str, bytes]]  # direction -> kind -> bytes
    epsilon: float = 0.0  # distance of the key the parts came from from uniform (ε_sec of its QKD block)

    def __repr__(self) -> str:
        return f"_Segment(round_id={self.round_id}, bytes={self.size})"

    @property
    def size(self) -> int:
        return sum(len(b) for d in self.parts.values() for b in d.values())


class RoundKeys:
    """The keys reserved for one round: a hash key and a pad per direction (never shown in ``repr``)."""

    def __init__(self, round_id: int, view: dict[str, _Direction], meta: dict[str, Any]) -> None:
        self.round_id = round_id
        self._view = view
        self.meta = meta
        self.hash_key = {d: view[d].r for d in DIRECTIONS}
        self.pad: dict[str, bytes] = meta.pop("pads")
        self.consumed_bytes: dict[str, int] = meta["consumed"]
        self.touched: set[str] = set()
        """Directions whose hash key and pad computed or verified a tag at this end (they stay burnt)."""

    def __repr__(self) -> str:
        return f"RoundKeys(round_id={self.round_id}, consumed_bytes={self.consumed_bytes}, keys=<hidden>)"

    @property
    def consumed_bits(self) -> int:
        """Key bits this round consumed from the pool, both directions (pads + fresh hash keys)."""
        return 8 * sum(self.consumed_bytes.values())


@dataclass
class RoundOutcome:
    """What a successfully authenticated round did to the pool, and what the node must do with keys.

    ``committed_round_ids``: earlier rounds both ends now hold: their keys may be released to the key
    store. ``dropped_round_ids``: earlier rounds the peer never accepted: delete their keys.
    ``pending_round_id``: this round, committed by a later round (or dropped). ``key_for_store``:
    the round key minus the pool's refill slice (the first bytes of the round key).
    """

    round_id: int
    consumed_bits: int
    refill_bits: int
    key_for_store: bytes = field(repr=False)
    committed_round_ids: list[int]
    dropped_round_ids: list[int]
    pending_round_id: int | None
    epsilon: float = 0.0
    """The round's authentication error: ``epsilon_mac + epsilon_key`` (Portmann 2014: messages·ε + ε′)."""
    epsilon_mac: float = 0.0
    """Forgery bound of the round's two tags (Bernstein 2005, Theorem 3.3)."""
    epsilon_key: float = 0.0
    """ε′: the summed distance from uniform (ε_sec) of every key the round's pads and hash keys came from."""


class AuthKeyPool:
    """Authentication key pool of one link (see the module docstring for the rules).

    Make one with :meth:`from_seed` (bootstrap: PSK bytes, or the key of a signature-authenticated
    first round) or :meth:`load`. Parameters: ``target_pad_bytes`` - pad balance per direction that
    refills aim at (default 512 bytes = 32 rounds); ``hash_reserve_bytes`` - hash-key balance per
    direction refills keep (default 64 = four keys: the link survives four failed verifications in a
    row before it needs a successful round); ``max_skip`` - how far (bytes) a peer's cursor
    may be ahead before the round is refused.
    """

    def __init__(
        self,
        link_id: str,
        *,
        path: str | os.PathLike[str] | None = None,
        persist: Callable[[bytes], None] | None = None,
        target_pad_bytes: int = 512,
        hash_reserve_bytes: int = 4 * HASH_KEY_BYTES,
        max_skip: int = 8 * PAD_BYTES,
    ) -> None:
        if not link_id:
            raise ConfigError("link_id must be a non-empty string.")
        if target_pad_bytes < PAD_BYTES:
            raise ConfigError(f"target_pad_bytes must be at least {PAD_BYTES}.")
        if hash_reserve_bytes < HASH_KEY_BYTES:
            raise ConfigError(f"hash_reserve_bytes must be at least {HASH_KEY_BYTES}.")
        self.link_id = link_id
        self.path = Path(path) if path is not None else None
        self._persist_cb = persist
        self.target_pad_bytes = target_pad_bytes
        self.hash_reserve_bytes = hash_reserve_bytes
        self.max_skip = max_skip
        self._dirs: dict[str, _Direction] = {d: _Direction() for d in DIRECTIONS}
        self._committed_count = 0
        self._committed_tail: list[int] = []
        self._pending: list[_Segment] = []
        self._seed_end: dict[str, dict[str, int]] = {d: {k: 0 for k in KINDS} for d in DIRECTIONS}
        self._seed_retired = False
        self.seed_check: str | None = None
        """Public fingerprint of the pre-shared key that seeded the pool (None for a signed bootstrap)."""
        self._last_round_id = SEED_ROUND_ID
        self._in_flight: int | None = None  # the round reserved and not yet completed, failed or released
        self._stats: dict[str, Any] = {
            "consumed_bytes": {d: 0 for d in DIRECTIONS},
            "refilled_bytes": {d: 0 for d in DIRECTIONS},
            "hash_key_refreshes": {d: 0 for d in DIRECTIONS},
            "rounds_authenticated": 0,
            "verification_failures": 0,
            "rounds_reserved": 0,
            "epsilon_sum": 0.0,
            "epsilon_mac_sum": 0.0,
            "epsilon_key_sum": 0.0,
        }

    def __repr__(self) -> str:
        bal = {d: self._dirs[d].pad.balance for d in DIRECTIONS}
        return f"AuthKeyPool(link_id={self.link_id!r}, pad_balance_bytes={bal}, pending={len(self._pending)})"

    # ------------------------------------------------------------------------------- creation

    @classmethod
    def from_seed(
        cls, link_id: str, seed: bytes, *, seed_epsilon: float = 0.0, seed_check: str | None = None, **kwargs: Any
    ) -> AuthKeyPool:
        """A pool seeded with ``seed`` (identical at both ends), committed as round 0.

        Layout: the first half of ``seed`` is the A->B material, the second half B->A; in each half
        the first :func:`seed_hash_bytes` bytes are hash keys (2 to 8 keys: every failed verification
        costs one, so a larger seed survives more tampered session openings) and the rest pads.
        At least 2*(32+32) = 128 bytes. ``seed_epsilon`` is the seed's distance from uniform: 0 for a
        pre-shared key from the OS CSPRNG, ε_sec for the key of a signature-authenticated round;
        ``seed_check`` the pre-shared key's public fingerprint, compared with the peer's at connection.
        """
        seed = bytes(seed)
        if len(seed) < 128 or len(seed) % 2:
            raise ConfigError("bootstrap seed must be an even number of bytes, at least 128.")
        pool = cls(link_id, **kwargs)
        pool.seed_check = seed_check
        half = len(seed) // 2
        n_hash = seed_hash_bytes(half)
        parts = {}
        for i, d in enumerate(DIRECTIONS):
            chunk = seed[i * half : (i + 1) * half]
            parts[d] = {"hash": chunk[:n_hash], "pad": chunk[n_hash:]}
        pool._commit_segment(pool._dirs, _Segment(SEED_ROUND_ID, parts, seed_epsilon))
        for d in DIRECTIONS:
            pool._stats["refilled_bytes"][d] += half
        for d in DIRECTIONS:
            for k in KINDS:
                pool._seed_end[d][k] = pool._dirs[d].stream(k).total
        pool._committed_count = 1
        pool._committed_tail = [SEED_ROUND_ID]
        pool.save()
        return pool

    # ------------------------------------------------------------------------------- accounting

    @property
    def last_round_id(self) -> int:
        """The newest round ID this pool reserved keys for (the next round must be newer)."""
        return self._last_round_id

    def balance_bytes(self, direction: str) -> int:
        """Pad bytes left for ``direction`` (committed, unconsumed)."""
        return self._dirs[direction].pad.balance

    def round_state(self, round_id: int) -> str | None:
        """``"pending"`` or ``"committed"`` (among the last committed rounds) for a round's refill, else None.

        A node uses it after a crash to decide what to do with a round key it had written aside.
        """
        if any(s.round_id == round_id for s in self._pending):
            return "pending"
        return "committed" if round_id in self._committed_tail else None

    def pending_refill_bytes(self, round_id: int) -> int | None:
        """Bytes of a pending round's key that went into the pool (the front of its round key), or None."""
        return next((s.size for s in self._pending if s.round_id == round_id), None)

    def rounds_affordable(self) -> int:
        """How many more rounds the committed pads pay for (ignoring refills and hash-key refreshes)."""
        return min(self._dirs[d].pad.balance for d in DIRECTIONS) // PAD_BYTES

    def report(self) -> dict[str, Any]:
        """Accounting: consumption, refills and balances per direction (bytes and bits), no key bytes."""
        dirs = {}
        for d in DIRECTIONS:
            dd = self._dirs[d]
            dirs[d] = {
                "pad_balance_bytes": dd.pad.balance,
                "hash_balance_bytes": dd.hash.balance,
                "consumed_bytes": self._stats["consumed_bytes"][d],
                "refilled_bytes": self._stats["refilled_bytes"][d],
                "hash_key_refreshes": self._stats["hash_key_refreshes"][d],
                "hash_key_in_use": dd.r is not None,
            }
        consumed = sum(self._stats["consumed_bytes"].values())
        refilled = sum(self._stats["refilled_bytes"].values())
        return {
            "link_id": self.link_id,
            "directions": dirs,
            "consumed_bits": 8 * consumed,
            "refilled_bits": 8 * refilled,
            "balance_bits": 8 * sum(self._dirs[d].pad.balance + self._dirs[d].hash.balance for d in DIRECTIONS),
            "rounds_authenticated": self._stats["rounds_authenticated"],
            "rounds_reserved": self._stats["rounds_reserved"],
            "verification_failures": self._stats["verification_failures"],
            "rounds_affordable": self.rounds_affordable(),
            # Portmann (2014): the error of all rounds so far is at most the sum over rounds of the tags' forgery
            # bounds (epsilon_mac_total) plus the distance from uniform of the keys each round drew its pads and
            # hash keys from (epsilon_key_total: epsilon' of QKD, the blocks' epsilon_sec)
            "epsilon_total": self._stats["epsilon_sum"],
            "epsilon_mac_total": self._stats["epsilon_mac_sum"],
            "epsilon_key_total": self._stats["epsilon_key_sum"],
            # the key blocks of the rounds this pool authenticated: sum of their epsilon_sec + epsilon_cor
            "epsilon_blocks_total": self._stats.get("epsilon_blocks_sum", 0.0),
            "committed_rounds": self._committed_count,
            "pending_round_ids": [s.round_id for s in self._pending],
            "bootstrap_seed_retired": self._seed_retired,
        }

    def fingerprint(self) -> dict[str, Any]:
        """Public lockstep state (cursors, totals, round ids): equal at both ends when in step."""
        return {
            "committed_count": self._committed_count,
            "committed_tail": list(self._committed_tail),
            "pending": [s.round_id for s in self._pending],
            **{
                d: {k: (self._dirs[d].stream(k).total, self._dirs[d].stream(k).cursor) for k in KINDS}
                | {"r_index": self._dirs[d].r_index}
                for d in DIRECTIONS
            },
        }

    # ------------------------------------------------------------------------------- the round

    def sync_state(self) -> dict[str, Any]:
        """The public state sent to the peer at the start of a round (ints only, no key bytes)."""
        return {
            "count": self._committed_count,
            "tail": list(self._committed_tail[-_TAIL:]),
            "pending": [s.round_id for s in self._pending],
            **{d: [self._dirs[d].hash.cursor, self._dirs[d].pad.cursor, self._dirs[d].r_index] for d in DIRECTIONS},
        }

    def reserve_round(self, peer_state: dict[str, Any], round_id: int) -> RoundKeys:
        """Merge with the peer's :meth:`sync_state` and reserve this round's keys (write-ahead persisted).

        Raises :class:`AuthenticationError` when the states cannot be reconciled (nothing is
        consumed then) and :class:`KeyPoolExhausted` when the pool cannot pay for the round.
        """
        # a round still in flight was abandoned without release(): its burns stand, it can no longer complete
        self._in_flight = None
        peer = _parse_sync(peer_state)
        last = self._last_round_id
        if round_id <= last:
            raise AuthenticationError(
                f"round id {round_id} of link {self.link_id} is not newer than the last ({last}); refusing a replay "
                f"(every round, aborted ones included, needs a new, larger id)"
            )
        mine_c = set(self._committed_tail)
        mine_p = {s.round_id for s in self._pending}
        promote = sorted(mine_p & set(peer["tail"]))
        peer_promote = sorted(set(peer["pending"]) & mine_c)
        if self._committed_count + len(promote) != peer["count"] + len(peer_promote):
            raise AuthenticationError(
                f"authentication key pools of link {self.link_id} are out of step "
                f"({self._committed_count} here vs {peer['count']} at the peer committed rounds): one end's state "
                "is older than the other's (restored from a backup, rolled back, or another pool); the round is "
                "refused before any key is used"
            )
        view = copy.deepcopy(self._dirs)
        seed_retired = self._seed_retired
        promoted = [s for s in self._pending if s.round_id in promote]
        for s in promoted:
            self._commit_segment(view, s)
        if not seed_retired and any(s.size for s in promoted):
            seed_retired = True
            self._retire_seed(view)
        consumed = {d: 0 for d in DIRECTIONS}
        pads: dict[str, bytes] = {}
        refreshed: list[str] = []
        sources: dict[int, float] = {}  # the keys this round's hash keys and pads come from (round id -> ε)
        for d in DIRECTIONS:
            dv = view[d]
            h_cur, p_cur, r_idx = peer[d]
            for k, pc in (("hash", h_cur), ("pad", p_cur)):
                st = dv.stream(k)
                if pc - st.cursor > self.max_skip:
                    raise AuthenticationError(
                        f"the peer's {d} {k} cursor on link {self.link_id} is {pc - st.cursor} bytes ahead "
                        f"(more than max_skip={self.max_skip}); the round is refused"
                    )
                st.skip_to(pc)
            need_fresh = dv.r is None or dv.r_index != r_idx
            need_hash = HASH_KEY_BYTES if need_fresh else 0
            if dv.hash.balance < need_hash or dv.pad.balance < PAD_BYTES:
                raise KeyPoolExhausted(
                    f"the authentication key pool of link {self.link_id} cannot pay for round {round_id}: "
                    f"direction {d} needs {PAD_BYTES} pad and {need_hash} hash-key bytes but holds "
                    f"{dv.pad.balance} and {dv.hash.balance}; the link stops rather than weaken authentication "
                    f"(bootstrap again with a new pre-shared key or a signed first round)"
                )
            if need_fresh:
                dv.r_sources = dv.hash.sources(HASH_KEY_BYTES)
                dv.r_index, dv.r = dv.hash.take(HASH_KEY_BYTES)
                refreshed.append(d)
                consumed[d] += HASH_KEY_BYTES
            sources.update(dv.r_sources)
            sources.update(dv.pad.sources(PAD_BYTES))
            _, pads[d] = dv.pad.take(PAD_BYTES)
            consumed[d] += PAD_BYTES
        # write-ahead: the real state burns everything the view used before any tag is computed; what it
        # held before is kept in memory so that a round that ends before any tag can give its keys back
        before = {d: copy.deepcopy(self._dirs[d]) for d in DIRECTIONS}
        for d in DIRECTIONS:
            for k in KINDS:
                self._dirs[d].stream(k).skip_to(view[d].stream(k).cursor)
            if d in refreshed:
                self._dirs[d].r, self._dirs[d].r_index = None, -1
                self._stats["hash_key_refreshes"][d] += 1
            self._stats["consumed_bytes"][d] += consumed[d]
        self._stats["rounds_reserved"] += 1
        self._last_round_id = round_id
        self._in_flight = round_id
        self.save()
        keep_pending = sorted((mine_p & set(peer["pending"])) - set(promote))
        meta = {
            "pads": pads,
            "consumed": consumed,
            "promote": promote,
            "keep_pending": keep_pending,
            "drop": sorted(mine_p - set(promote) - set(keep_pending)),
            "seed_retired": seed_retired,
            "key_epsilon": sum(sources.values()),
            "before": before,
            "refreshed": refreshed,
        }
        return RoundKeys(round_id, view, meta)

    def complete_round(
        self,
        keys: RoundKeys,
        round_key: bytes,
        *,
        mac_epsilon: float = 0.0,
        refill_epsilon: float = 0.0,
        block_epsilon: float = 0.0,
    ) -> RoundOutcome:
        """The round's tags verified at this end: persist the merged view and take the refill.

        The refill is the first bytes of ``round_key`` (identical at both ends): per direction,
        enough hash-key bytes to hold ``hash_reserve_bytes`` and enough pad bytes to reach
        ``target_pad_bytes``, in the order a2b-hash, a2b-pad, b2a-hash, b2a-pad; a short key gives
        what it has in that order. It stays pending until a later round commits it.
        ``mac_epsilon`` is the tags' forgery bound, ``refill_epsilon`` the distance of ``round_key``
        from uniform (its block's ε_sec), charged to every later round that draws from the refill;
        ``block_epsilon`` (ε_sec + ε_cor of the round's key block) is added to the link's running total
        of key-block errors (``report()["epsilon_blocks_total"]``).
        """
        self._check_in_flight(keys)
        self._in_flight = None
        view = keys._view
        meta = keys.meta
        kept = [s for s in self._pending if s.round_id in meta["keep_pending"]]
        for s in kept:
            self._commit_segment(view, s)
        committed = sorted(meta["promote"] + meta["keep_pending"])
        # the seed is retired once QKD key has replaced it, not when an empty round (entity
        # authentication on reconnection) is committed: that would leave nothing to pay with
        if any(s.size for s in kept) and not meta["seed_retired"]:
            self._retire_seed(view)
            meta["seed_retired"] = True
        for d in DIRECTIONS:  # never move a cursor back, whatever view is adopted
            for k in KINDS:
                view[d].stream(k).skip_to(self._dirs[d].stream(k).cursor)
        self._dirs = view
        self._seed_retired = meta["seed_retired"]
        self._committed_tail = (self._committed_tail + committed)[-_TAIL:]
        self._committed_count += len(committed)
        # refill from the round key
        key = bytes(round_key)
        pos = 0
        parts: dict[str, dict[str, bytes]] = {}
        for d in DIRECTIONS:
            dv = view[d]
            # what is left of the bootstrap seed does not count: committing this refill retires it
            left = {k: dv.stream(k).total - max(dv.stream(k).cursor, self._seed_end[d][k]) for k in KINDS}
            want = {
                "hash": max(0, self.hash_reserve_bytes - left["hash"]),
                "pad": max(0, self.target_pad_bytes - left["pad"]),
            }
            parts[d] = {}
            for k in KINDS:
                n = min(want[k], len(key) - pos)
                parts[d][k] = key[pos : pos + n]
                pos += n
                self._stats["refilled_bytes"][d] += n
        self._pending = [_Segment(keys.round_id, parts, refill_epsilon)]
        self._stats["rounds_authenticated"] += 1
        self._stats["epsilon_blocks_sum"] = self._stats.get("epsilon_blocks_sum", 0.0) + block_epsilon
        epsilon = self._charge(keys, mac_epsilon)
        self.save()
        return RoundOutcome(
            round_id=keys.round_id,
            consumed_bits=keys.consumed_bits,
            refill_bits=8 * pos,
            key_for_store=key[pos:],
            committed_round_ids=committed,
            dropped_round_ids=list(meta["drop"]),
            pending_round_id=keys.round_id,
            epsilon=epsilon,
            epsilon_mac=mac_epsilon,
            epsilon_key=keys.meta["key_epsilon"],
        )

    def _charge(self, keys: RoundKeys, mac_epsilon: float) -> float:
        """Add a finished round's authentication error to the link's total; returns it."""
        key_epsilon = keys.meta["key_epsilon"]
        self._stats["epsilon_mac_sum"] += mac_epsilon
        self._stats["epsilon_key_sum"] += key_epsilon
        self._stats["epsilon_sum"] += mac_epsilon + key_epsilon
        return mac_epsilon + key_epsilon

    def fail_round(self, keys: RoundKeys, failed_directions: list[str], mac_epsilon: float = 0.0) -> None:
        """A tag of ``failed_directions`` did not verify here: discard those hash keys (Portmann 2014).

        Everything else stays as :meth:`reserve_round` persisted it (pads burnt, merge not applied).
        """
        self._check_in_flight(keys)
        self._in_flight = None
        for d in failed_directions:
            if d not in DIRECTIONS:
                raise ConfigError(f"direction must be one of {DIRECTIONS}, not {d!r}.")
            self._dirs[d].r, self._dirs[d].r_index = None, -1
        self._stats["verification_failures"] += 1
        self._charge(keys, mac_epsilon)
        self.save()

    def release(self, keys: RoundKeys) -> None:
        """The round ended without a verification result (aborted, channel lost).

        A direction whose keys computed or checked no tag at this end (``keys.touched``) gets them back:
        a pad and hash key that never entered a tag or a verification revealed nothing, and the merge
        rule (cursors = max of both ends) keeps the two ends in step whatever the peer did. Without
        this, every round that aborts (a too-small frame, a high QBER, an eavesdropper) would burn a
        pad per direction and a run of aborts would exhaust the pool. Directions that were used keep
        their burns (Portmann 2014: a pad is consumed once a tag was computed or verified with it).
        """
        if self._in_flight != keys.round_id:
            return
        self._in_flight = None
        untouched = [d for d in DIRECTIONS if d not in keys.touched]
        for d in untouched:
            self._dirs[d] = keys.meta["before"][d]
            self._stats["consumed_bytes"][d] -= keys.consumed_bytes[d]
            if d in keys.meta["refreshed"]:
                self._stats["hash_key_refreshes"][d] -= 1
        if untouched:
            self.save()

    def _check_in_flight(self, keys: RoundKeys) -> None:
        if self._in_flight != keys.round_id:
            raise ConfigError(f"round {keys.round_id} of link {self.link_id} is not the round being authenticated.")

    # ------------------------------------------------------------------------------- internals

    def _commit_segment(self, dirs: dict[str, _Direction], seg: _Segment) -> None:
        for d in DIRECTIONS:
            for k in KINDS:
                dirs[d].stream(k).append(seg.parts[d][k], seg.round_id, seg.epsilon)

    def _retire_seed(self, view: dict[str, _Direction]) -> None:
        """Skip what is left of the bootstrap seed and discard a hash key taken from it."""
        for d in DIRECTIONS:
            for k in KINDS:
                view[d].stream(k).skip_to(self._seed_end[d][k])
            if 0 <= view[d].r_index < self._seed_end[d]["hash"]:
                view[d].r, view[d].r_index, view[d].r_sources = None, -1, {}

    # ------------------------------------------------------------------------------- persistence

    def lockstep_digest(self) -> str:
        """SHA-256 (hex) of everything that must be equal at both ends: key bytes, cursors, round ids.

        Two sites can compare it to confirm their pools are in step without showing key bytes.
        """
        doc = json.loads(self.to_bytes())
        for k in ("stats", "last_round_id"):
            doc.pop(k)
        return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()

    def to_bytes(self) -> bytes:
        """The serialised pool (contains key material: store it 0600)."""
        doc = {
            "format": "qkdstack-auth-pool",
            "version": _STATE_VERSION,
            "link_id": self.link_id,
            "params": {
                "target_pad_bytes": self.target_pad_bytes,
                "hash_reserve_bytes": self.hash_reserve_bytes,
                "max_skip": self.max_skip,
            },
            "committed_count": self._committed_count,
            "committed_tail": self._committed_tail,
            "seed_end": self._seed_end,
            "seed_retired": self._seed_retired,
            "seed_check": self.seed_check,
            "last_round_id": self._last_round_id,
            "pending": [
                {
                    "round_id": s.round_id,
                    "epsilon": s.epsilon,
                    "parts": {d: {k: s.parts[d][k].hex() for k in KINDS} for d in DIRECTIONS},
                }
                for s in self._pending
            ],
            "directions": {
                d: {
                    "hash": self._dirs[d].hash.to_json(),
                    "pad": self._dirs[d].pad.to_json(),
                    "r": self._dirs[d].r.hex() if self._dirs[d].r is not None else None,
                    "r_index": self._dirs[d].r_index,
                    "r_sources": [[rid, eps] for rid, eps in self._dirs[d].r_sources.items()],
                }
                for d in DIRECTIONS
            },
            "stats": self._stats,
        }
        return json.dumps(doc, sort_keys=True).encode()

    def save(self) -> None:
        """Persist now (atomic 0600 file and/or the callback); called after every change."""
        if self.path is None and self._persist_cb is None:
            return
        data = self.to_bytes()
        if self.path is not None:
            atomic_write(self.path, data, 0o600)
        if self._persist_cb is not None:
            self._persist_cb(data)

    @classmethod
    def from_bytes(
        cls,
        data: bytes,
        *,
        path: str | os.PathLike[str] | None = None,
        persist: Callable[[bytes], None] | None = None,
    ) -> AuthKeyPool:
        """Rebuild a pool from :meth:`to_bytes` output."""
        try:
            doc = json.loads(data)
            if doc.get("format") != "qkdstack-auth-pool":
                raise ConfigError("authentication pool state has an unknown format.")
            if doc.get("version") != _STATE_VERSION:
                raise ConfigError(
                    f"authentication pool state has version {doc.get('version')!r}, this qkdstack reads version "
                    f"{_STATE_VERSION} only (version 1 did not record the ε of its key material): bootstrap the "
                    "link again with a new pre-shared key or a signed first round."
                )
            pool = cls(doc["link_id"], path=path, persist=persist, **doc["params"])
            pool._committed_count = int(doc["committed_count"])
            pool._committed_tail = [int(x) for x in doc["committed_tail"]]
            pool._seed_end = {d: {k: int(doc["seed_end"][d][k]) for k in KINDS} for d in DIRECTIONS}
            pool._seed_retired = bool(doc["seed_retired"])
            pool.seed_check = doc["seed_check"]
            pool._last_round_id = int(doc["last_round_id"])
            pool._pending = [
                _Segment(
                    int(s["round_id"]),
                    {d: {k: bytes.fromhex(s["parts"][d][k]) for k in KINDS} for d in DIRECTIONS},
                    float(s["epsilon"]),
                )
                for s in doc["pending"]
            ]
            for d in DIRECTIONS:
                dd = doc["directions"][d]
                pool._dirs[d] = _Direction(
                    _Stream.from_json(dd["hash"]),
                    _Stream.from_json(dd["pad"]),
                    bytes.fromhex(dd["r"]) if dd["r"] is not None else None,
                    int(dd["r_index"]),
                    {int(rid): float(eps) for rid, eps in dd["r_sources"]},
                )
            pool._stats = doc["stats"]
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            if isinstance(exc, ConfigError):
                raise
            raise ConfigError("authentication pool state is malformed.") from None
        return pool

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> AuthKeyPool:
        """Load the pool persisted at ``path`` (which must not be readable by group or others)."""
        p = Path(path)
        if stat.S_IMODE(p.stat().st_mode) & 0o077:
            raise ConfigError(f"authentication pool file {p} must not be readable by group or others (chmod 600).")
        return cls.from_bytes(p.read_bytes(), path=p)


def seed_hash_bytes(half: int) -> int:
    """Hash-key bytes at the front of each direction's half of a seed of ``2*half`` bytes: 2 to 8 keys."""
    return HASH_KEY_BYTES * max(2, min(8, half // (4 * HASH_KEY_BYTES)))


def _parse_sync(state: Any) -> dict[str, Any]:
    """Validate a peer's sync message (it is unauthenticated until the round's tags verify)."""
    try:
        out = {
            "count": int(state["count"]),
            "tail": [int(x) for x in state["tail"]][-_TAIL:],
            "pending": [int(x) for x in state["pending"]][:MAX_PENDING],
        }
        for d in DIRECTIONS:
            h, p, r = (int(x) for x in state[d])
            if h < 0 or p < 0 or r < -1:
                raise ValueError
            out[d] = (h, p, r)
    except (KeyError, TypeError, ValueError):
        raise AuthenticationError("the peer's authentication pool state is malformed") from None
    return out


__all__ = ["A_TO_B", "B_TO_A", "AuthKeyPool", "RoundKeys", "RoundOutcome"]
