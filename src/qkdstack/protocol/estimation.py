"""Parameter estimation: test-basis errors per intensity and the decoy-state bounds.

Bob discloses his test-basis (X) bits (they never become key), Alice counts the errors
per intensity class and announces the counts. Both parties then hold the same public
counts — key-basis and test-basis detections per intensity, test-basis errors per
intensity — and compute the same finite-size decoy-state bounds of Lim, Curty, Walenta,
Xu and Zbinden, PRA 89, 022307 (2014), Eqs. (2)–(5): the vacuum and single-photon
key-basis counts and the single-photon phase-error rate.

The round aborts here, before any key bit is disclosed, when the test-basis QBER or the
phase-error bound exceeds its tolerance, or when even an optimistic error-correction
leakage would leave no key.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
from numba import njit

from qkdstack.bits import BitArray
from qkdstack.errors import ProtocolAbort
from qkdstack.protocol.channel import Channel
from qkdstack.protocol.sifting import SiftedKey
from qkdstack.theory.entropy import binary_entropy
from qkdstack.theory.finite import (
    DecoyBounds,
    DecoyCounts,
    FiniteKeyResult,
    lim2014_bounds,
    lim2014_secret_length,
)

STAGE = "estimation"


@dataclass(frozen=True)
class EstimationPolicy:
    """Tolerances and the public protocol parameters both parties agreed in advance."""

    intensities: tuple[float, ...]
    intensity_probs: tuple[float, ...]
    eps_sec: float = 1e-10
    eps_cor: float = 1e-15
    max_qber: float = 0.11
    max_phase_error: float = 0.2
    min_key_bits: int = 1000
    ec_efficiency_guess: float = 1.1
    """f used only to decide early whether a key is possible; the final length uses measured leakage."""


@dataclass(frozen=True)
class Estimate:
    """What both parties agree on after estimation."""

    counts: DecoyCounts
    bounds: DecoyBounds
    qber_test: float
    expected_length: int

    def to_dict(self) -> dict:
        return {
            "key_counts": list(self.counts.key_counts),
            "test_counts": list(self.counts.test_counts),
            "test_errors": list(self.counts.test_errors),
            "qber_test": self.qber_test,
            "phase_error_bound": self.bounds.phase_error,
            "s_key_0": self.bounds.s_key_0,
            "s_key_1": self.bounds.s_key_1,
            "expected_length": self.expected_length,
        }


@njit(cache=True, nogil=True)
def _class_counts(classes: np.ndarray, n_classes: int, where: np.ndarray) -> np.ndarray:
    """Counts of each class ``0..n_classes-1`` in one pass (only entries with ``where[i]``, if ``where`` is non-empty).

    Classes outside the range are not counted (as before this kernel): their bits then count for
    no intensity, which only lowers the decoy-state bounds.
    """
    counts = np.zeros(n_classes + 1, np.int64)
    masked = where.size > 0
    for i in range(classes.size):
        c = min(np.int64(classes[i]), n_classes)  # out-of-range classes land in the spare slot
        counts[c] += 1 if not masked else np.int64(where[i] != 0)
    return counts[:n_classes]


def _per_class(classes: np.ndarray, n_classes: int, where: np.ndarray | None = None) -> tuple[int, ...]:
    """Entries of each class ``0..n_classes-1`` (only those flagged in ``where``, if given), in one compiled pass."""
    flags = np.zeros(0, np.uint8) if where is None else np.ascontiguousarray(where, dtype=np.uint8)
    counts = _class_counts(np.ascontiguousarray(classes, dtype=np.uint8), n_classes, flags)
    return tuple(int(c) for c in counts)


def block_growth_needed(counts: DecoyCounts, qber: float, policy: EstimationPolicy) -> float | None:
    """How many times larger a block must be to pass estimation with a key, at the observed rates; or None.

    The phase-error bound φ of Lim 2014 Eq. (5) is the observed single-photon phase-error rate v/s (from
    Eqs. (2)–(4)) plus terms that shrink as the block grows: the Hoeffding deviations δ of the decoy
    counts (Eq. (A1)) and γ (Eq. (5)); the key length of Eq. (1) also pays fixed ε costs. With
    ``finite=False`` all of these are 0: the asymptotic bound and length on the same observed rates. When
    those pass, the block is merely too small, and the factor returned (every count scaled up, the rates
    kept) makes the finite bound pass with at least ``min_key_bits`` of expected key, with the same
    optimistic leakage as :func:`_assess`. When they do not (``None``), the errors themselves are too many
    (noise or an eavesdropper) and no block size helps.
    """
    h = binary_entropy(max(qber, 1e-4))

    def outcome(c: DecoyCounts, finite: bool) -> FiniteKeyResult:
        leak = policy.ec_efficiency_guess * c.n_key * h
        return lim2014_secret_length(c, leak, policy.eps_sec, policy.eps_cor, finite=finite)

    asymptotic = outcome(counts, False)
    if not (asymptotic.phase_error < policy.max_phase_error and asymptotic.length > 0):
        return None

    def passes(factor: float) -> bool:
        scaled = replace(counts, key_counts=tuple(factor * c for c in counts.key_counts),
                         test_counts=tuple(factor * c for c in counts.test_counts),
                         test_errors=tuple(factor * c for c in counts.test_errors))
        result = outcome(scaled, True)
        return result.phase_error <= policy.max_phase_error and result.length >= policy.min_key_bits

    low, high = 1.0, 2.0
    while not passes(high):
        low, high = high, 2 * high
        if high > 1e12:
            return None
    for _ in range(12):  # to ~1 %: the answer is advice, not a bound
        middle = math.sqrt(low * high)
        low, high = (low, middle) if passes(middle) else (middle, high)
    return high


def _too_small(counts: DecoyCounts, qber: float, policy: EstimationPolicy) -> str | None:
    """The advice for a block too small for the finite-key bound (see :func:`block_growth_needed`), or None."""
    factor = block_growth_needed(counts, qber, policy)
    if factor is None:
        return None
    return (f"the block of {counts.n_key:.0f} key-basis bits is too small for the finite-key bound: raise the frame "
            f"size ([device] pulses_per_frame, --pulses-per-frame; distill --pulses) at least "
            f"{math.ceil(factor * 10) / 10:g}-fold (about {factor * counts.n_key:.2g} key-basis bits a frame), "
            "better twice that")


def _phase_error_reason(counts: DecoyCounts, bounds: DecoyBounds, qber: float, policy: EstimationPolicy) -> str:
    """Why the phase-error bound failed: a block too small for the finite-key bound (and what to raise), or
    more errors than the tolerance allows at any block size (too few single photons or an eavesdropper)."""
    head = (f"phase-error bound {100 * bounds.phase_error:.2f}% exceeds the tolerance "
            f"{100 * policy.max_phase_error:.2f}%")
    advice = _too_small(counts, qber, policy)
    if advice is None:
        return f"{head} (too few single photons or an eavesdropper)"
    observed = lim2014_bounds(counts, policy.eps_sec, finite=False).phase_error
    return f"{head}, although the observed error rates bound it at {100 * observed:.2f}%: {advice}"


def _assess(sifted: SiftedKey, test_errors: tuple[int, ...], policy: EstimationPolicy) -> Estimate:
    """Both parties' identical computation from the public counts; raises ProtocolAbort."""
    k = len(policy.intensities)
    n_key = sifted.key_bits.size
    if n_key < policy.min_key_bits:
        raise ProtocolAbort(
            STAGE, f"too few detections: {n_key} key-basis bits, fewer than the minimum of {policy.min_key_bits}"
        )
    counts = DecoyCounts(
        intensities=policy.intensities,
        probabilities=policy.intensity_probs,
        key_counts=_per_class(sifted.key_intensity, k),
        test_counts=_per_class(sifted.test_intensity, k),
        test_errors=test_errors,
    )
    n_test = sum(counts.test_counts)
    if n_test == 0:
        raise ProtocolAbort(STAGE, "no test-basis detections to estimate the error rate from")
    qber = sum(test_errors) / n_test
    if qber > policy.max_qber:
        raise ProtocolAbort(
            STAGE, f"QBER {100 * qber:.2f}% in the test basis exceeds the tolerance {100 * policy.max_qber:.2f}%"
        )
    bounds = lim2014_bounds(counts, policy.eps_sec)
    if bounds.s_test_1 <= 0 or bounds.s_key_1 <= 0:
        raise ProtocolAbort(
            STAGE,
            f"too few detections: {n_key} key-basis and {n_test:.0f} test-basis bits cannot bound any single-photon "
            f"events at ε_sec = {policy.eps_sec:g}; use longer frames",
        )
    if not bounds.phase_error <= policy.max_phase_error:
        raise ProtocolAbort(STAGE, _phase_error_reason(counts, bounds, qber, policy))
    optimistic_leak = math.ceil(policy.ec_efficiency_guess * n_key * binary_entropy(max(qber, 1e-4)))
    expected = lim2014_secret_length(counts, optimistic_leak, policy.eps_sec, policy.eps_cor).length
    if expected <= 0:
        advice = _too_small(counts, qber, policy)
        raise ProtocolAbort(
            STAGE,
            f"no secret key possible: the finite-key bound leaves {expected} bits from {n_key} key-basis bits "
            f"(single-photon bound {bounds.s_key_1:.0f}, phase error {100 * bounds.phase_error:.2f}%)"
            + ("" if advice is None else f"; {advice}"),
        )
    return Estimate(counts, bounds, qber, expected)


async def alice(channel: Channel, sifted: SiftedKey, policy: EstimationPolicy) -> Estimate:
    """Alice counts test-basis errors per intensity from Bob's disclosed test bits."""
    msg = await channel.recv(expect="estimation.test_bits")
    bob_bits = msg["bits"]
    if not isinstance(bob_bits, BitArray) or len(bob_bits) != sifted.test_bits.size:
        raise ProtocolAbort(STAGE, "Bob's test-basis bits do not match the sifted count")
    bob_bits = bob_bits.to_bits()
    errors = _per_class(sifted.test_intensity, len(policy.intensities), bob_bits != sifted.test_bits)
    await channel.send("estimation.test_errors", errors=list(errors))
    return _assess(sifted, errors, policy)


async def bob(channel: Channel, sifted: SiftedKey, policy: EstimationPolicy) -> Estimate:
    """Bob discloses his test-basis bits and receives the error counts."""
    await channel.send("estimation.test_bits", bits=BitArray.from_bits(sifted.test_bits))
    msg = await channel.recv(expect="estimation.test_errors")
    errors = msg["errors"]
    if not isinstance(errors, list) or not all(type(e) is int for e in errors):
        raise ProtocolAbort(STAGE, "malformed test-basis error counts")
    errors = tuple(errors)
    if len(errors) != len(policy.intensities) or any(e < 0 for e in errors):
        raise ProtocolAbort(STAGE, "malformed test-basis error counts")
    per_class_tests = _per_class(sifted.test_intensity, len(policy.intensities))
    if any(e > n for e, n in zip(errors, per_class_tests, strict=True)):
        raise ProtocolAbort(STAGE, "Alice reported more test-basis errors than test-basis bits")
    return _assess(sifted, errors, policy)
