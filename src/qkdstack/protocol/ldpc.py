"""Syndrome-based LDPC reconciliation, rate-adapted by shortening, with blind rounds.

Roles and messages (all kinds start with ``"ldpc."``):

1. Both parties derive the same *plan* from public data: the key length N and the QBER
   estimate q (the test-basis QBER, floored): the code of the family
   (:mod:`qkdstack.protocol.ldpc_codes`) of highest rate whose syndrome still carries
   f_start·h(q) bits per key bit, and the payload k ≤ n of every codeword so that
   m/k ≈ f_start·h(q). The frame is split into ⌈N/k⌉ codewords of near-equal payload.
   The n − k positions of a codeword that carry no key bit are *shortened*: fixed to 0 and
   known to both, so they are never sent (Elkouss, Martinez-Mateo, Martin, QIC 11 (2011),
   rate adaptation by shortening; the code's rate drops from 1 − m/n to (k − m)/k).
2. ``ldpc.start`` (Alice → Bob): a public seed (which positions of each codeword carry key
   bits, and the order in which key bits may be revealed), the plan, and — disclosed — the m
   syndrome bits of every codeword.
3. Bob decodes each codeword with layered belief propagation (sum-product, or normalised min-sum)
   (:func:`decode_batch`, a Numba kernel, ``nogil``), looking for the error pattern
   e = x ⊕ y with syndrome H·x ⊕ H·y, and answers ``ldpc.status`` with one disclosed bit per
   codeword still open: 1 decoded (the syndrome is satisfied), 0 failed.
4. Blind rounds (Martinez-Mateo, Elkouss, Martin, "Blind reconciliation", QIC 12 (2012)):
   for every failed codeword, ``ldpc.reveal`` (Alice → Bob) discloses the values of
   Δ = ⌈blind_step·k·h(q)⌉ further key bits, in the public order; Bob fixes them (as shortened
   bits) and decodes again; ``ldpc.status`` again. The original protocol converts punctured
   symbols into shortened ones; here the revealed symbols are key bits, which keeps the
   accounting literal (every revealed bit is key-dependent and counted). After
   ``max_blind_rounds`` a codeword that still fails gives up the whole frame: both parties
   raise :class:`~qkdstack.errors.ProtocolAbort` naming how many codewords failed.

Leakage: everything that crosses is ``disclosed`` and counted by the channel: the syndromes
and revealed bits (Alice → Bob) and Bob's status bits (Bob → Alice; his success/failure
is a function of the error pattern, so against general attacks it counts too). λ_ldpc =
m·(codewords) + revealed + status bits. Bob's decoded word satisfies the syndrome but may
still differ from Alice's (a wrong codeword); the verification stage catches that, as after
Cascade.
"""

from __future__ import annotations

import asyncio
import math
import secrets
from dataclasses import dataclass, field

import numpy as np
from numba import njit

from qkdstack.bits import BitArray
from qkdstack.errors import ConfigError, ProtocolAbort
from qkdstack.protocol import ldpc_codes
from qkdstack.protocol.channel import RECEIVED, SENT, Channel

__all__ = ["LdpcParams", "LdpcResult", "Plan", "alice", "bob", "decode_batch", "make_plan"]

STAGE = "ldpc"
KNOWN_LLR = np.float32(64.0)
"""|LLR| of a bit both parties know (shortened or revealed): large enough never to be a check's minimum."""


def binary_entropy(q: float) -> float:
    if q <= 0.0 or q >= 1.0:
        return 0.0
    return -q * math.log2(q) - (1 - q) * math.log2(1 - q)


@dataclass(frozen=True)
class LdpcParams:
    """Public parameters of the LDPC stage (both parties must use the same)."""

    f_start: float = 1.08
    """Target efficiency of the first attempt: syndrome bits per key bit = f_start·h(q)."""
    blind_step: float = 0.03
    """Each blind round reveals blind_step·k·h(q) more key bits of every failed codeword."""
    max_blind_rounds: int = 8
    code_n: int = ldpc_codes.DEFAULT_N
    code_seed: int = ldpc_codes.DEFAULT_SEED
    max_iterations: int = 60
    alpha: float = 0.0
    """0: sum-product (the default; Gallager's phi form). > 0: normalised min-sum with check messages
    scaled by alpha (Chen & Fossorier 2002) — faster, but on these irregular codes far from capacity."""

    def public(self) -> dict[str, float | int]:
        return {"f_start": self.f_start, "blind_step": self.blind_step, "max_blind_rounds": self.max_blind_rounds,
                "code_n": self.code_n, "code_seed": self.code_seed, "max_iterations": self.max_iterations,
                "alpha": self.alpha}


@dataclass(frozen=True)
class Plan:
    """How a frame of ``n_key`` bits maps onto codewords of one code."""

    rate: float
    n_key: int
    payloads: tuple[int, ...]
    reveal_step: tuple[int, ...]

    @property
    def codewords(self) -> int:
        return len(self.payloads)


def make_plan(n_key: int, qber: float, params: LdpcParams) -> Plan:
    """The code and the payload of every codeword for ``n_key`` key bits at QBER estimate ``qber``."""
    if n_key <= 0:
        raise ConfigError("the LDPC stage needs a non-empty key")
    h = binary_entropy(qber)
    if h <= 0.0:
        raise ConfigError("the LDPC stage needs a QBER estimate strictly between 0 and 1")
    n = params.code_n
    need = params.f_start * h
    if need >= 1.0:
        raise ProtocolAbort(STAGE, f"QBER estimate {100 * qber:.2f}% is beyond the reach of syndrome "
                                   "reconciliation (the syndrome would be longer than the key)")
    rate = min(ldpc_codes.RATES)  # below the lowest rate, shortening lowers it further
    for r in sorted(ldpc_codes.RATES, reverse=True):
        if round(n * (1.0 - r)) >= need * n:
            rate = r
            break
    m = round(n * (1.0 - rate))
    k = min(n, int(m / need))
    count = -(-n_key // k)
    base, extra = divmod(n_key, count)
    payloads = tuple(base + (1 if i < extra else 0) for i in range(count))
    steps = tuple(max(1, math.ceil(params.blind_step * p * h)) for p in payloads)
    return Plan(rate, n_key, payloads, steps)


@dataclass
class LdpcResult:
    """The outcome at one party (``key``: Bob's corrected bits, or Alice's unchanged bits)."""

    key: np.ndarray = field(repr=False)
    leaked_bits: int
    round_trips: int
    codewords: int
    code: str
    blind_rounds: int
    revealed_bits: int
    syndrome_bits: int
    status_bits: int
    failed_first: int
    """Codewords that failed their first decoding (before any blind round)."""
    errors_corrected: int = 0
    iterations: int = 0


# --------------------------------------------------------------------------------------------
# Numba kernels


@njit(cache=True, nogil=True, inline="always")
def _phi(x):
    x = min(max(x, np.float32(1e-7)), np.float32(30.0))
    return np.float32(-math.log(math.tanh(x / 2)))


@njit(cache=True, nogil=True)
def _decode_one(row_ptr, col_idx, llr0, synd, max_iter, alpha, L, R, tmp, phis):
    """Layered normalised min-sum on one codeword; L holds the posteriors. Returns iterations used (−1: failed)."""
    n = llr0.size
    m = row_ptr.size - 1
    for v in range(n):
        L[v] = llr0[v]
    for e in range(R.size):
        R[e] = 0.0
    for it in range(max_iter):
        for c in range(m):
            start = row_ptr[c]
            end = row_ptr[c + 1]
            sgn = synd[c]
            min1 = np.float32(1e30)
            min2 = np.float32(1e30)
            idx = -1
            for e in range(start, end):
                t = L[col_idx[e]] - R[e]
                tmp[e - start] = t
                a = t
                if t < 0:
                    sgn ^= 1
                    a = -t
                if a < min1:
                    min2 = min1
                    min1 = a
                    idx = e
                elif a < min2:
                    min2 = a
            if alpha > 0:
                m1 = alpha * min1
                m2 = alpha * min2
                for e in range(start, end):
                    t = tmp[e - start]
                    mag = m2 if e == idx else m1
                    s = sgn
                    if t < 0:
                        s ^= 1
                    r = -mag if s else mag
                    R[e] = r
                    L[col_idx[e]] = t + r
            else:  # sum-product: phi(x) = -log tanh(x/2) is its own inverse (Gallager)
                total = np.float32(0.0)
                for e in range(start, end):
                    a = abs(tmp[e - start])
                    ph = _phi(a)
                    phis[e - start] = ph
                    total += ph
                for e in range(start, end):
                    t = tmp[e - start]
                    mag = _phi(max(total - phis[e - start], np.float32(1e-7)))
                    s = sgn
                    if t < 0:
                        s ^= 1
                    r = -mag if s else mag
                    R[e] = r
                    L[col_idx[e]] = t + r
        ok = True
        for c in range(m):
            p = synd[c]
            for e in range(row_ptr[c], row_ptr[c + 1]):
                if L[col_idx[e]] < 0:
                    p ^= 1
            if p:
                ok = False
                break
        if ok:
            return it + 1
    return -1


@njit(cache=True, nogil=True)
def decode_batch(row_ptr, col_idx, llr0, synd, max_iter, alpha, err_out, iters_out):
    """Decode every row of ``llr0`` (error-pattern LLRs) against the matching row of ``synd``.

    ``err_out[i]`` receives the hard decision of codeword i's error pattern and
    ``iters_out[i]`` the iterations used, or −1 when the syndrome was never satisfied.
    """
    count, n = llr0.shape
    L = np.empty(n, dtype=np.float32)
    R = np.empty(col_idx.size, dtype=np.float32)
    maxdeg = 0
    for c in range(row_ptr.size - 1):
        d = row_ptr[c + 1] - row_ptr[c]
        if d > maxdeg:
            maxdeg = d
    tmp = np.empty(maxdeg, dtype=np.float32)
    phis = np.empty(maxdeg, dtype=np.float32)
    a = np.float32(alpha)
    for i in range(count):
        iters_out[i] = _decode_one(row_ptr, col_idx, llr0[i], synd[i], max_iter, a, L, R, tmp, phis)
        for v in range(n):
            err_out[i, v] = 1 if L[v] < 0 else 0


@njit(cache=True, nogil=True)
def _syndromes(row_ptr, col_idx, words, out):
    for i in range(words.shape[0]):
        for c in range(row_ptr.size - 1):
            s = 0
            for e in range(row_ptr[c], row_ptr[c + 1]):
                s ^= words[i, col_idx[e]]
            out[i, c] = s


# --------------------------------------------------------------------------------------------
# Helpers shared by both parties


def _layout(seed: int, plan: Plan, n: int) -> tuple[np.ndarray, np.ndarray]:
    """The key positions in a codeword (a public permutation of 0..n-1; the first k carry key bits)
    and the public order in which payload indices are revealed."""
    rng = np.random.default_rng(seed)
    positions = rng.permutation(n).astype(np.int64)
    order = rng.permutation(max(plan.payloads)).astype(np.int64)
    return positions, order


def _reveal_indices(order: np.ndarray, k: int, start: int, count: int) -> np.ndarray:
    """Payload indices start..start+count-1 of the reveal order, restricted to a payload of k bits."""
    valid = order[order < k]
    return valid[start : start + count]


def _words(key: np.ndarray, plan: Plan, positions: np.ndarray, n: int) -> np.ndarray:
    words = np.zeros((plan.codewords, n), dtype=np.uint8)
    off = 0
    for i, k in enumerate(plan.payloads):
        words[i, positions[:k]] = key[off : off + k]
        off += k
    return words


def _offsets(plan: Plan) -> np.ndarray:
    return np.concatenate([[0], np.cumsum(plan.payloads)]).astype(np.int64)


def _check_key(key: np.ndarray) -> np.ndarray:
    arr = np.asarray(key)
    if arr.ndim != 1 or arr.size == 0:
        raise ConfigError("key must be a non-empty one-dimensional array of bits")
    if arr.dtype.kind not in "biu" or int(arr.max(initial=0)) > 1 or int(arr.min(initial=0)) < 0:
        raise ConfigError("key must contain only the bits 0 and 1")
    return np.ascontiguousarray(arr, dtype=np.uint8)


def _snapshot(channel: Channel) -> tuple[int, int, int]:
    stats = channel.stats
    return stats.disclosed_bits(STAGE, SENT), stats.disclosed_bits(STAGE, RECEIVED), stats.messages(STAGE, SENT)


def _give_up(failed: int, plan: Plan, params: LdpcParams) -> ProtocolAbort:
    return ProtocolAbort(STAGE, f"{failed} of {plan.codewords} codewords failed to decode after "
                                f"{params.max_blind_rounds} blind rounds; the frame is given up")


# --------------------------------------------------------------------------------------------
# The two parties


async def alice(
    channel: Channel, key: np.ndarray, qber_estimate: float, params: LdpcParams | None = None, *,
    seed: int | None = None,
) -> LdpcResult:
    """Alice's side: send the syndromes, then reveal key bits of failed codewords until Bob decodes all."""
    params = params or LdpcParams()
    bits = _check_key(key)
    plan = make_plan(bits.size, qber_estimate, params)
    code = ldpc_codes.get_code(plan.rate, params.code_n, params.code_seed)
    seed = secrets.randbits(63) if seed is None else seed
    positions, order = _layout(seed, plan, code.n)
    snap0 = _snapshot(channel)
    words = _words(bits, plan, positions, code.n)
    synd = np.empty((plan.codewords, code.m), dtype=np.uint8)
    _syndromes(code.row_ptr, code.col_idx, words, synd)
    await channel.send("ldpc.start", disclosed=BitArray.from_bits(synd.ravel()), seed=seed, n_key=bits.size,
                       code=code.name, codewords=plan.codewords)
    offsets = _offsets(plan)
    open_ = np.arange(plan.codewords)
    revealed = np.zeros(plan.codewords, dtype=np.int64)
    failed_first = 0
    blind = 0
    while True:
        status = await channel.recv(expect="ldpc.status")
        if status.disclosed is None or len(status.disclosed) != open_.size:
            raise ProtocolAbort(STAGE, f"ldpc.status must carry {open_.size} status bits")
        ok = status.disclosed.to_bits().astype(bool)
        if blind == 0:
            failed_first = int(np.count_nonzero(~ok))
        open_ = open_[~ok]
        if open_.size == 0:
            break
        if blind >= params.max_blind_rounds:
            raise _give_up(open_.size, plan, params)
        blind += 1
        out = []
        for i in open_:
            k = plan.payloads[i]
            idx = _reveal_indices(order, k, int(revealed[i]), plan.reveal_step[i])
            revealed[i] += idx.size
            out.append(bits[offsets[i] + idx])
        await channel.send("ldpc.reveal", disclosed=BitArray.from_bits(np.concatenate(out)), round=blind)
    sent, received, round_trips = (b - a for a, b in zip(snap0, _snapshot(channel), strict=True))
    return LdpcResult(
        key=bits.copy(), leaked_bits=sent + received, round_trips=round_trips, codewords=plan.codewords,
        code=code.name, blind_rounds=blind, revealed_bits=int(revealed.sum()), syndrome_bits=int(synd.size),
        status_bits=received, failed_first=failed_first,
    )


async def bob(
    channel: Channel, key: np.ndarray, qber_estimate: float, params: LdpcParams | None = None,
) -> LdpcResult:
    """Bob's side: decode every codeword to Alice's word; report each outcome; take revealed bits on failure."""
    params = params or LdpcParams()
    bits = _check_key(key)
    plan = make_plan(bits.size, qber_estimate, params)
    code = ldpc_codes.get_code(plan.rate, params.code_n, params.code_seed)
    snap0 = _snapshot(channel)
    start = await channel.recv(expect="ldpc.start")
    if int(start["n_key"]) != bits.size:
        raise ProtocolAbort(STAGE, f"key length mismatch: Alice has {int(start['n_key'])} bits, Bob {bits.size}")
    if str(start["code"]) != code.name or int(start["codewords"]) != plan.codewords:
        raise ProtocolAbort(STAGE, f"code mismatch: Alice uses {start['code']} x {start['codewords']}, "
                                   f"Bob {code.name} x {plan.codewords}")
    if start.disclosed is None or len(start.disclosed) != plan.codewords * code.m:
        raise ProtocolAbort(STAGE, "ldpc.start carries the wrong number of syndrome bits")
    positions, order = _layout(int(start["seed"]), plan, code.n)
    words = _words(bits, plan, positions, code.n)
    synd_a = start.disclosed.to_bits().reshape(plan.codewords, code.m)
    synd_b = np.empty_like(synd_a)
    _syndromes(code.row_ptr, code.col_idx, words, synd_b)
    target = synd_a ^ synd_b
    q = min(max(qber_estimate, 1e-4), 0.5 - 1e-4)
    llr = np.full((plan.codewords, code.n), KNOWN_LLR, dtype=np.float32)
    channel_llr = np.float32(math.log((1 - q) / q))
    for i, k in enumerate(plan.payloads):
        llr[i, positions[:k]] = channel_llr
    offsets = _offsets(plan)
    err = np.zeros((plan.codewords, code.n), dtype=np.uint8)
    iters = np.zeros(plan.codewords, dtype=np.int32)
    open_ = np.arange(plan.codewords)
    revealed = np.zeros(plan.codewords, dtype=np.int64)
    failed_first = 0
    blind = 0
    total_iters = 0
    while True:
        sub_err = np.empty((open_.size, code.n), dtype=np.uint8)
        sub_it = np.empty(open_.size, dtype=np.int32)
        await asyncio.to_thread(decode_batch, code.row_ptr, code.col_idx, llr[open_], target[open_],
                                params.max_iterations, params.alpha, sub_err, sub_it)
        err[open_] = sub_err
        iters[open_] = sub_it
        total_iters += int(np.abs(sub_it).sum())
        ok = sub_it >= 0
        if blind == 0:
            failed_first = int(np.count_nonzero(~ok))
        await channel.send("ldpc.status", disclosed=BitArray.from_bits(ok.astype(np.uint8)))
        open_ = open_[~ok]
        if open_.size == 0:
            break
        if blind >= params.max_blind_rounds:
            raise _give_up(open_.size, plan, params)
        blind += 1
        msg = await channel.recv(expect="ldpc.reveal")
        counts = []
        for i in open_:
            idx = _reveal_indices(order, plan.payloads[i], int(revealed[i]), plan.reveal_step[i])
            counts.append(idx)
        total = sum(idx.size for idx in counts)
        if msg.disclosed is None or len(msg.disclosed) != total:
            raise ProtocolAbort(STAGE, "ldpc.reveal carries the wrong number of bits")
        values = msg.disclosed.to_bits()
        pos = 0
        for i, idx in zip(open_, counts, strict=True):
            alice_bits = values[pos : pos + idx.size]
            pos += idx.size
            revealed[i] += idx.size
            e = alice_bits ^ bits[offsets[i] + idx]
            llr[i, positions[idx]] = np.where(e == 1, -KNOWN_LLR, KNOWN_LLR)
    corrected = bits.copy()
    for i, k in enumerate(plan.payloads):
        corrected[offsets[i] : offsets[i] + k] ^= err[i, positions[:k]]
    sent, received, round_trips = (b - a for a, b in zip(snap0, _snapshot(channel), strict=True))
    return LdpcResult(
        key=corrected, leaked_bits=sent + received, round_trips=round_trips, codewords=plan.codewords,
        code=code.name, blind_rounds=blind, revealed_bits=int(revealed.sum()), syndrome_bits=int(synd_a.size),
        status_bits=sent, failed_first=failed_first,
        errors_corrected=int(np.count_nonzero(corrected != bits)), iterations=total_iters,
    )
