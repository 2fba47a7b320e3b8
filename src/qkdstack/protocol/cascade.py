"""Cascade error correction (Brassard & Salvail 1993), batched and with measured leakage.

Alice holds the reference key, Bob a noisy copy; after Cascade Bob's key equals Alice's
with high probability. Roles and messages (all kinds start with ``"cascade."``):

1. ``cascade.start`` (Alice → Bob): a public permutation seed from :mod:`secrets`, the key
   length and the block sizes of every pass (public), and — disclosed — the parity of every
   top-level block of every pass. For passes ≥ 2 the last block's parity is *not* sent:
   it is implied by the parity of the whole key, which the pass-1 parities already give
   (the "block parity inference" discussed by Martinez-Mateo et al. 2015).
2. ``cascade.ask`` (Bob → Alice), answered by ``cascade.parities`` (Alice → Bob): Bob runs
   the BINARY searches of *every* block whose parity disagrees, in every active pass, at the
   same time. One ask lists the left half (pass, start, end — public descriptors) of the
   current range of every open search; Alice answers with the parities of those ranges
   (disclosed). Bob derives the right half's parity from the parent's, so each level of
   every search costs one disclosed bit and all searches share one round trip per level.
   Every ask also carries, disclosed, Bob's *decision bits* (see "Leakage" below).
3. When a search ends on a single bit, Bob flips it. The flip toggles the parity of the
   block holding that bit in every other active pass (the cascade effect); every block
   that becomes odd is searched in the same batched fashion, together with the searches
   still running. Before each level Bob re-checks each open search against its known
   Alice parity, so a search whose range lost its odd disagreement to a flip elsewhere is
   dropped instead of misled (the block is reopened if it is still odd).
4. Pass i+1 starts, without any extra message, when no search of passes ≤ i is open (in
   long frames, with ``batched``, already when only a few are: see :class:`CascadeSchedule`).
5. ``cascade.done`` (Bob → Alice) ends the stage; it carries the last decision bits.

Both parties keep the key packed, and for every shuffled pass the key packed in that pass's
order (:mod:`qkdstack.protocol.cascade_kernels`), so every parity is a few word XORs and a
popcount; Bob's local work between round trips is one compiled call.

Sub-block reuse: for every block, Bob remembers the path (leaf and Alice's parities of the
ranges along it) of the last search completed there. When the block is reopened, the
search first walks down that path for free — the parities are already public — and asks
only below the point where it leaves it.

Leakage
-------
Leakage is whatever crossed the channel as ``disclosed`` bits, in both directions:
λ_cascade = Alice's parities + Bob's decision bits (Lim et al. 2014 define λ_EC as the bits
revealed during error correction; against general attacks that is *everything* the error
correction sent, both ways). Why Bob's side costs at most one bit per parity of Alice:

Let r_1, r_2, … be the ranges (sets of key positions) whose parity Alice disclosed, a_i = ⟨r_i, X⟩
her parity of range i on her key X, and d_i = ⟨r_i, X ⊕ Y⟩ the disagreement on it with Bob's
sifted key Y. Bob reads his key *only* through parities ⟨r, Y ⊕ F⟩ of his current key, where F
(the bits he flipped so far) is fixed by the transcript, and only on ranges r in the GF(2)
span of the r_i: the top-level blocks (the last block of a pass ≥ 2 is the whole key minus
the others, the whole key being the sum of the pass-1 blocks), the asked left halves, the
right halves (parent minus left half), and the recorded search paths re-walked for free.
Comparing with Alice's parity of r gives ⟨r, X ⊕ Y⟩ ⊕ ⟨r, F⟩, a function of the d_i and of the
transcript. So every message of Bob is a deterministic function of the public seed, of
Alice's messages and of the d_i of the parities she disclosed so far: H(Bob's messages |
Alice's messages) ≤ number of Alice's parities. The usual accounting (Alice's parities only)
additionally assumes that the d_i — the error pattern — carry no information about X, which
holds for noise independent of the key but not against an eavesdropper who shapes the errors.

To keep "leakage is measured" literal, Bob *sends* those bits: each ``cascade.ask`` (and the
final ``cascade.done``) carries, as ``disclosed``, his decision bit ⟨r_i, X ⊕ Y ⊕ F⟩ = Alice's
parity XOR his own for every parity Alice disclosed since his previous message (the answers
to his last question, and the top-level parities of every pass he started meanwhile, except
the implied last block of passes ≥ 2). His questions are then a deterministic function of
bits that crossed the channel, and the channel counts exactly one Bob bit per Alice parity
at both ends; Alice checks the totals agree at ``cascade.done``. The extra bits cost
m/8 bytes next to the 12 bytes per question.

``CascadeResult.parity_bits`` (Alice's parities: the numerator of the usual efficiency f,
comparable with the literature), ``decision_bits`` (Bob's) and ``leaked_bits`` (their sum, the
stage's λ) are read from the channel counters.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from qkdstack.bits import BitArray
from qkdstack.errors import ConfigError, ProtocolAbort
from qkdstack.protocol import cascade_kernels as K  # noqa: N812
from qkdstack.protocol import public_random
from qkdstack.protocol.channel import RECEIVED, SENT, Channel

__all__ = [
    "MIN_QBER",
    "SCHEDULES",
    "CascadeResult",
    "CascadeSchedule",
    "alice",
    "block_sizes",
    "bob",
    "get_schedule",
]

STAGE = "cascade"
MIN_QBER = 1e-3
"""Floor applied to the QBER estimate: an estimate of 0 would make the first blocks unbounded."""


@dataclass(frozen=True)
class CascadeSchedule:
    """Block sizes and number of passes of a Cascade variant, as data.

    ``initial_block(Q)`` gives k1. Passes 2, 3, … take their sizes from ``fixed_blocks``
    (functions of Q) while those last; after that each pass multiplies the previous size by
    ``growth`` (``math.inf``: half the key). Every size is clamped to [1, ⌈n/2⌉].
    ``lookahead``: when at most max(lookahead, lookahead_per_bit * n) searches are open, each
    asks two levels per round trip (one extra parity per search and round trip; 0 = never);
    ``lookahead_per_bit`` may be a function of Q.
    Tail measures, only once ``tail_round_trips`` round trips have passed (long frames):
    ``early_per_bit``/``early_min``: the next pass starts, at most one per round trip, as soon as
    at most max(early_min, early_per_bit * n) searches are open instead of none, so the serial
    end of the cascade chains overlaps with the later passes (early_per_bit 0: never);
    ``deep_lookahead``/``deep_lookahead_per_bit``: when at most max(deep_lookahead,
    deep_lookahead_per_bit * n) searches are open, each asks the 7 parities of its next three
    levels (0: never).
    """

    name: str
    passes: int
    initial_block: Callable[[float], int]
    growth: float = 2.0
    fixed_blocks: tuple[Callable[[float], int], ...] = ()
    lookahead: int = 0
    lookahead_per_bit: float | Callable[[float], float] = 0.0
    early_per_bit: float = 0.0
    early_min: int = 0
    deep_lookahead: int = 0
    deep_lookahead_per_bit: float = 0.0
    tail_round_trips: int = 0
    citation: str = ""

    def block_sizes(self, qber: float, n: int) -> list[int]:
        """Block size of every pass for QBER estimate ``qber`` and key length ``n``."""
        q = _clamp_qber(qber)
        cap = max(1, -(-n // 2))
        sizes = [int(self.initial_block(q))]
        for i in range(1, self.passes):
            if i - 1 < len(self.fixed_blocks):
                sizes.append(int(self.fixed_blocks[i - 1](q)))
            elif math.isinf(self.growth):
                sizes.append(cap)
            else:
                sizes.append(math.ceil(sizes[-1] * self.growth))
        return [min(cap, max(1, k)) for k in sizes]


def _alpha(q: float) -> float:
    return math.log2(1.0 / q) - 0.5


ORIGINAL = CascadeSchedule(
    name="original",
    passes=4,
    initial_block=lambda q: math.ceil(0.73 / q),
    growth=2.0,
    citation="Brassard & Salvail, EUROCRYPT 1993, as stated in Martinez-Mateo et al., QIC 15 (2015): "
    "k1 = ceil(0.73/Q), k_i = 2 k_(i-1), 4 passes",
)

OPTIMIZED = CascadeSchedule(
    name="optimized",
    passes=14,
    initial_block=lambda q: 2 ** math.ceil(_alpha(q)),
    growth=math.inf,
    fixed_blocks=(lambda q: 2 ** math.ceil((_alpha(q) + 12.0) / 2.0), lambda q: 4096),
    citation="Martinez-Mateo, Pacher, Peev, Ciurana, Martin, QIC 15 (2015), arXiv:1407.3257, "
    "'Cascade opt. (8)': alpha = log2(1/Q) - 1/2, k1 = 2^ceil(alpha), k2 = 2^ceil((alpha+12)/2), "
    "k3 = 4096, k_i = n/2 for i >= 4, 14 passes, block sizes powers of two",
)


def _batched_k1(q: float) -> int:
    return 2 ** round(math.log2(0.9 / q))


def _batched_lookahead(q: float) -> float:
    k1q = _batched_k1(q) * q
    return 4e-4 if 0.7 <= k1q < 0.9 else 5e-5


def _batched_k2(q: float) -> int:
    k1 = _batched_k1(q)
    return (4 if k1 * q < 0.9 else 2) * k1


BATCHED = CascadeSchedule(
    name="batched",
    passes=14,
    initial_block=_batched_k1,
    growth=math.inf,
    fixed_blocks=(_batched_k2, lambda q: 4096),
    lookahead=12,
    lookahead_per_bit=_batched_lookahead,
    early_per_bit=1e-5,
    early_min=8,
    deep_lookahead=4,
    deep_lookahead_per_bit=4.8e-5,
    tail_round_trips=60,
    citation="qkdstack variant tuned for few round trips, following the guidelines of Martinez-Mateo et al. (2015) "
    "(power-of-two k1, k3 = 4096, then n/2, 14 passes): k1 = 2^round(log2(0.9/Q)) so that k1*Q lies in "
    "[0.64, 1.27), k2 = 4 k1 if k1*Q < 0.9 else 2 k1, two-level look-ahead once at most max(12, c n) searches "
    "are open (c = 4e-4 if k1*Q is in [0.7, 0.9), where k2 = 4 k1 makes longer chains, else 5e-5), and after "
    "60 round trips the next pass starts once at most max(8, 1e-5 n) searches are open and searches ask three "
    "levels at once while at most max(4, 4.8e-5 n) are open. "
    "The round trips are set by the serial pass-1/pass-2 cascade chains, whose length grows with k1*Q and k2/k1",
)


SCHEDULES: dict[str, CascadeSchedule] = {s.name: s for s in (ORIGINAL, OPTIMIZED, BATCHED)}


def get_schedule(schedule: CascadeSchedule | str) -> CascadeSchedule:
    """Resolve a schedule name (``"original"``, ``"optimized"``) or pass a schedule through."""
    if isinstance(schedule, CascadeSchedule):
        if schedule.passes < 1:
            raise ConfigError(f"schedule.passes must be at least 1, got {schedule.passes}")
        return schedule
    try:
        return SCHEDULES[schedule]
    except (KeyError, TypeError):
        raise ConfigError(f"schedule must be one of {sorted(SCHEDULES)}, got {schedule!r}") from None


def _clamp_qber(qber: float) -> float:
    try:
        q = float(qber)
    except (TypeError, ValueError):
        raise ConfigError(f"qber_estimate must be a number, got {qber!r}") from None
    if not math.isfinite(q) or q < 0.0 or q >= 0.5:
        raise ConfigError(f"qber_estimate must lie in [0, 0.5), got {q!r}")
    return max(q, MIN_QBER)


def block_sizes(schedule: CascadeSchedule | str, qber: float, n: int) -> list[int]:
    """Block sizes of every pass of ``schedule`` for QBER ``qber`` and key length ``n``."""
    return get_schedule(schedule).block_sizes(qber, n)


@dataclass
class CascadeResult:
    """The outcome at one party.

    ``key``: Bob's corrected bits, or Alice's unchanged bits (uint8 0/1). ``leaked_bits``:
    disclosed bits that crossed the channel in this run (both directions, from the
    channel's counters), split into ``parity_bits`` (Alice's) and ``decision_bits`` (Bob's).
    ``round_trips``: message exchanges (Bob's asks plus the closing
    done; equals the messages Alice sent). ``errors_corrected``: bits Bob flipped (0 at
    Alice). Cascade cannot tell whether errors remain; the verification stage does.
    """

    key: np.ndarray = field(repr=False)
    leaked_bits: int
    round_trips: int
    passes: int
    errors_corrected: int
    block_sizes: list[int]
    parity_bits: int = 0
    """Alice's disclosed parities (Alice → Bob): the usual Cascade leakage, numerator of f."""
    decision_bits: int = 0
    """Bob's disclosed decision bits (Bob → Alice); ``leaked_bits = parity_bits + decision_bits``."""


def _check_key(key: np.ndarray) -> np.ndarray:
    arr = np.asarray(key)
    if arr.ndim != 1 or arr.size == 0:
        raise ConfigError("key must be a non-empty one-dimensional array of bits")
    if arr.size and (arr.dtype.kind not in "biu" or int(arr.max(initial=0)) > 1 or int(arr.min(initial=0)) < 0):
        raise ConfigError("key must contain only the bits 0 and 1")
    return np.ascontiguousarray(arr, dtype=np.uint8)


def _blocks(n: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    starts = np.arange(0, n, k, dtype=np.int64)
    ends = np.minimum(starts + k, n)
    return starts, ends


TILE_MIN_N = 2**18
"""Keys of at least this length read a pass of ≥ 4096-bit blocks that follows a keyed-permutation
pass (pass 3 of ``optimized``/``batched``) through a tile shuffle of that pass
(:func:`cascade_kernels.make_tile_params`); the words after the last whole tile, which it does
not mix, are then at most 1.6 % of the key."""

MASK_MIN_N = 256
"""Keys of at least this length read their two-block passes through mask shuffles (see
:func:`cascade_kernels.make_mask_params`); shorter keys keep the keyed permutations."""


def _derive_permutations(
    seed: int, n: int, passes: int, sizes: list[int] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Permutation parameters of every pass (pass 1: identity) from the public seed.

    With ``sizes`` (the block sizes of the run), passes of two blocks (size ⌈n/2⌉) get mask
    shuffles, whose top-level parity is a popcount over the packed key. Returns the parameters
    and, per pass, the member-count table of its mask shuffle (:func:`cascade_kernels.mask_cum`;
    rows of other passes are unused).
    """
    rng = np.random.default_rng(seed)
    params = np.empty((passes, K.NPARAM), dtype=np.uint64)
    params[0] = K.identity_params(n)
    cap = max(1, -(-n // 2))
    mask = [j for j in range(1, passes) if sizes is not None and n >= MASK_MIN_N and sizes[j] == cap]
    mcum = np.zeros((passes if mask else 1, (n + 63) // 64 + 1), dtype=np.int64)
    for j in range(1, passes):
        if j in mask:
            params[j] = K.make_mask_params(rng, n, mcum[j])
        elif sizes is not None and n >= TILE_MIN_N and j >= 2 and sizes[j] >= K.TILE and params[j - 1, K.P_MODE] == 1:
            params[j] = K.make_tile_params(rng, params[j - 1], j - 1)
        else:
            params[j] = K.make_permutation_params(rng, n)
    return params, mcum


def _shuffled_rows(packed: np.ndarray, params: np.ndarray, passes: range | None = None) -> np.ndarray:
    """Row 0: the packed key; row j of a keyed-permutation pass: the packed key in that pass's order.

    Every range parity of every pass is then a run of word XORs and one popcount
    (:func:`cascade_kernels.range_parity`); rows of the other passes are left unset and never read.
    """
    shuf = np.empty((params.shape[0], packed.size), dtype=np.uint64)
    shuf[0] = packed
    for j in passes if passes is not None else range(1, params.shape[0]):
        _fill_row(shuf, params, j)
    return shuf


def _fill_row(shuf: np.ndarray, params: np.ndarray, j: int) -> None:
    """Fill row j of ``shuf`` from row 0 (keyed permutation) or from its source pass's row (tile shuffle)."""
    if params[j, K.P_MODE] == 1:
        K.shuffled_words(shuf[0], params[j], shuf[j])
    elif params[j, K.P_MODE] == 3:
        K.tile_words(shuf[int(params[j, K.P_SRC])], params[j], shuf[j])


def _snapshot(channel: Channel) -> tuple[int, int, int]:
    """(disclosed bits sent, disclosed bits received, messages sent) in the Cascade stage so far."""
    stats = channel.stats
    return stats.disclosed_bits(STAGE, SENT), stats.disclosed_bits(STAGE, RECEIVED), stats.messages(STAGE, SENT)


async def alice(
    channel: Channel,
    key: np.ndarray,
    qber_estimate: float,
    schedule: CascadeSchedule | str = "optimized",
    *,
    seed_rng: np.random.Generator | None = None,
) -> CascadeResult:
    """Alice's side: publish top-level parities, then answer Bob's batched parity questions.

    ``seed_rng`` (tests and benchmarks only) draws the public permutation seed
    reproducibly; by default it comes from :mod:`secrets`.
    """
    bits = _check_key(key)
    sched = get_schedule(schedule)
    n = bits.size
    sizes = sched.block_sizes(qber_estimate, n)
    snap0 = _snapshot(channel)
    seed = int(seed_rng.integers(0, 2**63 - 1)) if seed_rng is not None else public_random.randbits(63)
    params, mcum = _derive_permutations(seed, n, sched.passes, sizes)
    shuf = _shuffled_rows(K.pack_key(bits), params)
    tops = []
    for j, k in enumerate(sizes):
        count = -(-n // k)
        if j > 0:  # the last block's parity is implied by the key's parity (pass 1)
            count -= 1
        out = np.empty(count, dtype=np.uint8)
        K.top_parities(shuf, params, mcum, j, k, count, out)
        tops.append(out)
    top_bits = np.concatenate(tops) if tops else np.zeros(0, np.uint8)
    await channel.send(
        "cascade.start",
        disclosed=BitArray.from_bits(top_bits),
        seed=seed,
        n=n,
        block_sizes=np.asarray(sizes, dtype=np.int64),
        schedule=sched.name,
    )
    answered = top_bits.size
    decided = 0  # Bob's decision bits so far: one per parity disclosed, never more
    while True:
        msg = await channel.recv()
        if msg.kind not in ("cascade.ask", "cascade.done"):
            raise ProtocolAbort(STAGE, f"unexpected message {msg.kind!r} during Cascade")
        decided += len(msg.disclosed) if msg.disclosed is not None else 0
        if decided > answered:
            raise ProtocolAbort(STAGE, "Bob sent more decision bits than parities were disclosed")
        if msg.kind == "cascade.done":
            if decided != answered:
                raise ProtocolAbort(STAGE, f"Bob sent {decided} decision bits for {answered} disclosed parities")
            break
        q = msg.fields.get("q")
        if not (isinstance(q, np.ndarray) and q.ndim == 2 and q.shape[1] == 3 and q.dtype.kind in "iu"):
            raise ProtocolAbort(STAGE, "malformed parity question")
        if q.dtype not in (np.int32, np.int64):
            q = q.astype(np.int64)
        m = q.shape[0]
        answered += m
        if answered > 2 * n + 1024:  # far beyond any honest run: refuse to keep disclosing
            raise ProtocolAbort(STAGE, "Bob asked for more parities than twice the key length")
        out = np.empty((m + 7) // 8, dtype=np.uint8)
        if not K.answer_questions(shuf, params, mcum, q, out):
            raise ProtocolAbort(STAGE, "parity question outside the key")
        await channel.send("cascade.parities", disclosed=BitArray.adopt(out, m))
    out_bits, in_bits, round_trips = (b - a for a, b in zip(snap0, _snapshot(channel), strict=True))
    return CascadeResult(
        key=bits.copy(),
        leaked_bits=out_bits + in_bits,
        round_trips=round_trips,
        passes=int(msg.fields.get("passes", sched.passes)),
        errors_corrected=0,
        block_sizes=sizes,
        parity_bits=out_bits,
        decision_bits=in_bits,
    )


class _Bob:
    """Bob's state: packed working key and shuffled rows, top-level mismatches, open searches."""

    def __init__(
        self, bits: np.ndarray, sizes: list[int], params: np.ndarray, mcum: np.ndarray, top: list[np.ndarray]
    ) -> None:
        self.n = bits.size
        # Row 0: Bob's packed key (corrected in place); a keyed-permutation pass's row is filled
        # from it when the pass starts and then kept equal to it under every correction.
        self.shuf = _shuffled_rows(K.pack_key(bits), params, range(0))
        self.mcum = mcum
        self.sizes = np.asarray(sizes, dtype=np.int64)
        self.params = params
        self.alice_top = top
        nblocks = [-(-self.n // k) for k in sizes]
        self.mism_off = np.concatenate([[0], np.cumsum(nblocks)]).astype(np.int64)
        self.mism = np.zeros(int(self.mism_off[-1]), dtype=np.uint8)
        self.alice_flat = np.concatenate(top).astype(np.uint8)
        self.busy = np.zeros(self.mism.size, dtype=np.uint8)  # 1 while a search is open on the block
        self.rec_leaf = np.full(self.mism.size, -1, dtype=np.int64)
        self.rec_bits = np.zeros(self.mism.size, dtype=np.uint64)
        self.active = 0
        # The open searches, one row each (struct of arrays, capacity one per block); rows [0, m).
        cap = self.mism.size
        # (np.empty: a row is written when its search opens, before anything reads it)
        self.p, self.b, self.s, self.e, self.d, self.leaf = (np.empty(cap, dtype=np.int64) for _ in range(6))
        self.a = np.empty(cap, dtype=np.uint8)
        self.bits, self.rbits = np.empty(cap, dtype=np.uint64), np.empty(cap, dtype=np.uint64)
        self.on = np.empty(cap, dtype=np.bool_)
        # scratch of resolve_searches (flag and dirty are all zero between calls)
        self.flag, self.dirty = np.zeros(cap, dtype=np.uint8), np.zeros(cap, dtype=np.uint8)
        self.pend, self.xs, self.dlist = (np.empty(cap, dtype=np.int64) for _ in range(3))
        self.mark = np.zeros(self.n, dtype=np.uint8)
        self.m = 0
        self._none = np.zeros(0, dtype=np.int64)
        self.corrected = 0
        self.lookahead = 0
        self._depth = np.zeros(self.mism.size, dtype=np.uint8)
        self.deep = 0
        self._q = np.empty((0, 3), dtype=np.int32 if self.n < 2**31 else np.int64)
        self.early = 0
        self.early_round = -1
        self.tail_start = 0
        self.rounds = 0
        self.decisions: list[BitArray] = []  # decision bits not yet sent to Alice, in order

    def activate(self) -> None:
        """Start the next pass: Bob's own top-level parities (of his current key) against Alice's."""
        j = self.active
        k = int(self.sizes[j])
        lo, hi = self.mism_off[j], self.mism_off[j + 1]
        count = int(hi - lo)
        _fill_row(self.shuf, self.params, j)
        mine = np.empty(count, dtype=np.uint8)
        K.top_parities(self.shuf, self.params, self.mcum, j, k, count, mine)
        self.mism[lo:hi] = mine ^ self.alice_top[j]
        # Decision bits of the parities Alice disclosed for this pass (not the implied last one).
        self.decisions.append(BitArray.from_bits(self.mism[lo : hi if j == 0 else hi - 1]))
        self.active += 1

    def key(self) -> np.ndarray:
        """Bob's corrected key (uint8 0/1)."""
        return np.unpackbits(self.shuf[0].astype("<u8", copy=False).view(np.uint8), count=self.n, bitorder="little")

    def resolve(self) -> None:
        """Local work until every open search needs a parity from Alice (or none is open).

        Only blocks that may have turned odd are examined: those touched by a correction,
        those whose search was dropped, and all blocks of a newly activated pass (one
        compiled call, :func:`cascade_kernels.resolve_searches`, between activations).
        """
        cand = self._none
        while True:
            self.m, flipped = K.resolve_searches(
                self.shuf, self.params, self.mcum, self.sizes, self.mism, self.mism_off, self.busy,
                self.rec_leaf, self.rec_bits, self.alice_flat, self.active,
                self.p, self.b, self.s, self.e, self.a, self.d, self.bits, self.leaf, self.rbits, self.on,
                self.m, cand, self.flag, self.dirty, self.pend, self.xs, self.dlist, self.mark,
            )  # fmt: skip
            self.corrected += flipped
            if self.active < self.sizes.size and (
                self.m == 0
                or (self.m <= self.early and self.rounds >= self.tail_start and self.rounds > self.early_round)
            ):
                j = self.active
                if self.m:
                    self.early_round = self.rounds  # early: at most one pass per round trip
                self.activate()
                cand = np.arange(self.mism_off[j], self.mism_off[j + 1], dtype=np.int64)
                continue
            return

    def question(self) -> np.ndarray:
        """The ranges to ask about, one (pass, start, end) row each: the left half of every search's range.

        When at most ``lookahead`` searches are open (the serial tail of the cascade chains),
        a search whose range has at least 4 bits also asks for the left quarter of each half,
        so one round trip descends two levels at the cost of one extra parity. Past
        ``tail_round_trips``, when at most ``deep_lookahead`` searches are open, a search of at
        least 8 bits asks all 7 parities of the next three levels.
        """
        m = self.m
        depth = 1
        if m <= self.lookahead:
            depth = 2
        if m <= self.deep and self.rounds >= self.tail_start:
            depth = 3
        if self._q.shape[0] < ((1 << depth) - 1) * m:
            self._q = np.empty((((1 << depth) - 1) * m, 3), dtype=self._q.dtype)
        rows = K.build_question(self.p[:m], self.s[:m], self.e[:m], depth, self._depth[:m], self._q)
        return self._q[:rows]

    def decide(self, q: np.ndarray, parities: np.ndarray) -> None:
        """Record the decision bits of Alice's answers to ``q``: her parity XOR Bob's, per range.

        Bob's own parities come from his current key (no flip happens between a question and
        its answer), computed like Alice's answers; they are sent with his next message.
        """
        mine = np.empty(parities.size, dtype=np.uint8)
        K.answer_questions(self.shuf, self.params, self.mcum, q, mine)
        np.bitwise_xor(mine, parities, out=mine)
        self.decisions.append(BitArray.adopt(mine, q.shape[0]))

    def take_decisions(self) -> BitArray | None:
        """The decision bits not yet sent, in order, as one bit array (None when there are none)."""
        chunks, self.decisions = self.decisions, []
        if len(chunks) == 1 and len(chunks[0]):  # the usual case: the answers to the last question only
            return chunks[0]
        bits = np.concatenate([c.to_bits() for c in chunks]) if chunks else np.zeros(0, np.uint8)
        return BitArray.from_bits(bits) if bits.size else None

    def answer(self, parities: np.ndarray) -> None:
        """Descend every search with Alice's parities (packed, MSB first)."""
        m = self.m
        K.apply_answers(
            self.shuf,
            self.params,
            self.mcum,
            self.p[:m],
            self.s[:m],
            self.e[:m],
            self.a[:m],
            self.d[:m],
            self.bits[:m],
            self._depth[:m],
            parities,
        )
        self.on[:m] = False


async def bob(
    channel: Channel,
    key: np.ndarray,
    qber_estimate: float,
    schedule: CascadeSchedule | str = "optimized",
) -> CascadeResult:
    """Bob's side: drive the batched binary searches and correct his copy of the key."""
    bits = _check_key(key).copy()
    sched = get_schedule(schedule)
    n = bits.size
    sizes = sched.block_sizes(qber_estimate, n)
    snap0 = _snapshot(channel)
    start = await channel.recv(expect="cascade.start")
    theirs = [int(x) for x in np.asarray(start["block_sizes"]).tolist()]
    if int(start["n"]) != n:
        raise ProtocolAbort(STAGE, f"key length mismatch: Alice has {int(start['n'])} bits, Bob {n}")
    if theirs != sizes:
        raise ProtocolAbort(STAGE, f"block schedule mismatch: Alice uses {theirs}, Bob {sizes}")
    seed = int(start["seed"])
    params, mcum = _derive_permutations(seed, n, sched.passes, sizes)
    disclosed = start.disclosed
    nblocks = [-(-n // k) for k in sizes]
    expected = nblocks[0] + sum(nb - 1 for nb in nblocks[1:])
    if disclosed is None or len(disclosed) != expected:
        raise ProtocolAbort(STAGE, "cascade.start carries the wrong number of parities")
    flat = disclosed.to_bits()
    top = [flat[: nblocks[0]]]
    total = int(np.bitwise_xor.reduce(top[0], initial=0))
    pos = nblocks[0]
    for nb in nblocks[1:]:
        part = flat[pos : pos + nb - 1]
        pos += nb - 1
        last = total ^ int(np.bitwise_xor.reduce(part, initial=0))
        top.append(np.concatenate([part, np.array([last], dtype=np.uint8)]))

    state = _Bob(bits, sizes, params, mcum, top)
    per_bit = sched.lookahead_per_bit
    per_bit = per_bit(_clamp_qber(qber_estimate)) if callable(per_bit) else per_bit
    state.lookahead = max(sched.lookahead, round(per_bit * n))
    state.early = max(sched.early_min, round(sched.early_per_bit * n)) if sched.early_per_bit else 0
    state.tail_start = sched.tail_round_trips
    state.deep = max(sched.deep_lookahead, round(sched.deep_lookahead_per_bit * n))
    while True:
        state.resolve()
        if state.m == 0:
            break
        q = state.question()
        await channel.send("cascade.ask", disclosed=state.take_decisions(), q=q)
        reply = await channel.recv(expect="cascade.parities")
        if reply.disclosed is None or len(reply.disclosed) != q.shape[0]:
            raise ProtocolAbort(STAGE, "cascade.parities carries the wrong number of parities")
        state.decide(q, reply.disclosed.packed)
        state.answer(reply.disclosed.packed)
        state.rounds += 1
    await channel.send("cascade.done", disclosed=state.take_decisions(), passes=state.active)
    out_bits, in_bits, round_trips = (b - a for a, b in zip(snap0, _snapshot(channel), strict=True))
    return CascadeResult(
        key=state.key(),
        leaked_bits=out_bits + in_bits,
        round_trips=round_trips,
        passes=state.active,
        errors_corrected=state.corrected,
        block_sizes=sizes,
        parity_bits=in_bits,
        decision_bits=out_bits,
    )
