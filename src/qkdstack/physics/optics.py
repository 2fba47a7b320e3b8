"""Closed-form per-pulse statistics of the device: what arrives at Bob, and how his detectors answer.

Everything the simulator samples comes from two exact, finite tables built here:

1. The *light table* (:func:`light_table`): for one pulse, the joint probability of
   Alice's intensity class k, her basis a, the emitted photon number n (Poisson(μ_k)), the
   number j of photons that reach the entrance of Bob's receiver, the polarisation state
   they carry (basis s; ``rel`` = 0 if their bit is Alice's bit, 1 if it is a fresh random
   bit, as after a wrong-basis intercept-resend), and whether Eve learns Alice's bit
   (``ek``). The channel and the eavesdropper act here.
2. The *receiver response* (:func:`click_pattern_probs`): given j photons in state (s, rel)
   and Bob's basis β, the probability of each click pattern of his two detectors
   (none; only the detector of Alice's bit, "R"; only the other one, "W"; both). Each
   photon is detected with probability η_Bob and goes to the wrong detector with
   probability e_mis when β = s (1/2 when β ≠ s); each detector adds a dark count with
   probability p_dc = 1 − sqrt(1 − Y0). Photons act independently, so with
   q_R, q_W the per-photon probabilities of reaching each detector:
   P(R silent) = (1 − p_dc)(1 − q_R)^j, P(W silent) = (1 − p_dc)(1 − q_W)^j,
   P(both silent) = (1 − p_dc)²(1 − q_R − q_W)^j, and the patterns follow by inclusion–exclusion.

The *event table* (:func:`event_table`) composes the two (summing over j) into the
probability of (k, a, β, n, pattern, ek) for one pulse. Summed over n, and with no Eve,
P(pattern ≠ none | k) = 1 − (1 − Y0)·exp(−η_sys μ_k) = D_k exactly (Lim et al., PRA 89,
022307 (2014), simulation model), and the error probability of matching-basis clicks is
Y0/2 + e_mis(1 − exp(−η_sys μ_k)) up to terms of order e_mis·(η_sys μ_k)³ from double
clicks, which the model of Lim et al. neglects (double clicks are squashed to a random bit).

Photon numbers are enumerated up to n_max with a Poisson tail below 1e-18, so the tables
are exact to float precision.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from scipy import stats

from qkdstack.physics.eve import (
    BeamSplitting,
    Eavesdropper,
    InterceptResend,
    NoEve,
    PhotonNumberSplitting,
)
from qkdstack.physics.params import DeviceParams, ReceiverParams

PATTERN_NONE, PATTERN_R, PATTERN_W, PATTERN_BOTH = 0, 1, 2, 3
"""Click patterns relative to Alice's bit b: R is the detector of bit b, W that of 1 − b."""

_TAIL = 1e-18


def max_photon_number(mu: float) -> int:
    """Smallest n_max with P(Poisson(μ) > n_max) < 1e-18."""
    if mu <= 0:
        return 0
    n = math.ceil(mu)
    while stats.poisson.sf(n, mu) >= _TAIL:
        n += 1
    return n


@dataclass(frozen=True)
class LightTable:
    """Per-pulse joint distribution of Alice's settings and the light reaching Bob's receiver.

    Rows are outcomes; columns: ``k`` class, ``a`` Alice's basis, ``n`` emitted photons,
    ``j`` photons at Bob's receiver, ``s`` their basis, ``rel`` (0: Alice's bit, 1: random
    bit), ``ek`` (Eve learns Alice's bit), ``prob`` (probabilities summing to 1).
    """

    k: np.ndarray
    a: np.ndarray
    n: np.ndarray
    j: np.ndarray
    s: np.ndarray
    rel: np.ndarray
    ek: np.ndarray
    prob: np.ndarray


@dataclass(frozen=True)
class EventTable:
    """Per-pulse joint distribution of (k, a, β, n, pattern, ek); rows sum to 1."""

    k: np.ndarray
    a: np.ndarray
    beta: np.ndarray
    n: np.ndarray
    pattern: np.ndarray
    ek: np.ndarray
    prob: np.ndarray

    def select(self, mask: np.ndarray) -> EventTable:
        """The rows where ``mask`` holds (probabilities not renormalised)."""
        return EventTable(*(getattr(self, f)[mask] for f in ("k", "a", "beta", "n", "pattern", "ek", "prob")))


def _poisson_pmf(mu: float, n_max: int) -> np.ndarray:
    n = np.arange(n_max + 1)
    if mu <= 0:
        return (n == 0).astype(float)
    return stats.poisson.pmf(n, mu)


def _binom_matrix(n_max: int, q: float) -> np.ndarray:
    """B[n, j] = C(n, j) q^j (1 − q)^(n − j) for 0 ≤ j ≤ n ≤ n_max."""
    n = np.arange(n_max + 1)[:, None]
    j = np.arange(n_max + 1)[None, :]
    with np.errstate(divide="ignore", invalid="ignore"):
        b = stats.binom.pmf(j, n, q)
    return np.where(j <= n, np.nan_to_num(b), 0.0)


def pns_forwarding(params: DeviceParams) -> tuple[float, float]:
    """(s, t): the fractions of single-photon and multi-photon pulses a PNS Eve forwards.

    Eve forwards n − 1 photons of a multi-photon pulse losslessly (so Bob clicks with
    1 − (1 − η_Bob)^(n−1)) and single photons losslessly (η_Bob). She matches the
    photon-induced click probability of the signal intensity, 1 − exp(−η_sys μ_1): first
    by blocking single photons (s < 1), and when the multi-photon pulses alone already give
    more clicks, by blocking all single photons and a fraction 1 − t of the multi-photon
    pulses. When even forwarding everything falls short (very short links) she forwards
    everything (s = t = 1) and Bob's rate drops.
    """
    mu = params.source.intensities[0]
    eta_b = params.receiver.efficiency
    target = -math.expm1(-params.eta_sys * mu)
    n_max = max_photon_number(mu)
    pn = _poisson_pmf(mu, n_max)
    n = np.arange(n_max + 1)
    multi = float(np.sum(pn[2:] * -np.expm1((n[2:] - 1) * math.log1p(-eta_b)))) if eta_b < 1 else float(pn[2:].sum())
    single = float(pn[1]) * eta_b if n_max >= 1 else 0.0
    if multi >= target:
        return 0.0, (target / multi if multi > 0 else 0.0)
    if single <= 0:
        return 1.0, 1.0
    return min(1.0, (target - multi) / single), 1.0


def light_table(params: DeviceParams, eve: Eavesdropper) -> LightTable:
    """Build the light table (see the module docstring) for ``params`` under attack ``eve``."""
    return _light_table_cached(params, eve)


@lru_cache(maxsize=64)
def _light_table_cached(params: DeviceParams, eve: Eavesdropper) -> LightTable:
    src, ch = params.source, params.channel
    eta_ch = ch.transmittance
    cols: dict[str, list[np.ndarray]] = {f: [] for f in ("k", "a", "n", "j", "s", "rel", "ek", "prob")}

    def add(k: int, a: int, n: np.ndarray, j: np.ndarray, s: int, rel: int, ek: np.ndarray, prob: np.ndarray) -> None:
        keep = prob > 0
        size = int(keep.sum())
        if size == 0:
            return
        cols["k"].append(np.full(size, k, np.uint8))
        cols["a"].append(np.full(size, a, np.uint8))
        cols["n"].append(np.asarray(n)[keep].astype(np.int32))
        cols["j"].append(np.asarray(j)[keep].astype(np.int32))
        cols["s"].append(np.full(size, s, np.uint8))
        cols["rel"].append(np.full(size, rel, np.uint8))
        cols["ek"].append(np.asarray(ek)[keep].astype(np.uint8))
        cols["prob"].append(np.asarray(prob)[keep].astype(np.float64))

    pns_s, pns_t = pns_forwarding(params) if isinstance(eve, PhotonNumberSplitting) else (1.0, 1.0)
    for k, (mu, pk) in enumerate(zip(src.intensities, src.intensity_probs, strict=True)):
        n_max = max_photon_number(mu)
        pn = _poisson_pmf(mu, n_max)
        n_col = np.repeat(np.arange(n_max + 1), n_max + 1).reshape(n_max + 1, n_max + 1)
        j_col = np.tile(np.arange(n_max + 1), n_max + 1).reshape(n_max + 1, n_max + 1)
        n_vec = np.arange(n_max + 1)
        zeros = np.zeros(n_max + 1, np.int32)
        for a, pa in ((0, src.p_z), (1, 1 - src.p_z)):
            w = pk * pa
            if isinstance(eve, NoEve):
                joint = pn[:, None] * _binom_matrix(n_max, eta_ch)
                add(k, a, n_col.ravel(), j_col.ravel(), a, 0, np.zeros(joint.size), w * joint.ravel())
            elif isinstance(eve, InterceptResend):
                f = eve.fraction
                # Not intercepted: the honest fibre.
                joint = pn[:, None] * _binom_matrix(n_max, eta_ch)
                add(k, a, n_col.ravel(), j_col.ravel(), a, 0, np.zeros(joint.size), (1 - f) * w * joint.ravel())
                # Intercepted at Bob's entrance: m ≥ 1 photons arrive with 1 − (1 − η_ch)^n.
                p_arrive = -np.expm1(n_vec * math.log1p(-eta_ch)) if eta_ch < 1 else (n_vec > 0).astype(float)
                add(k, a, n_vec, zeros, a, 0, zeros, f * w * pn * (1 - p_arrive))
                ones = np.ones(n_max + 1, np.int32)
                add(k, a, n_vec, ones, a, 0, ones, f * w * pn * p_arrive / 2)  # Eve's basis = Alice's
                add(k, a, n_vec, ones, 1 - a, 1, zeros, f * w * pn * p_arrive / 2)  # wrong basis
            elif isinstance(eve, PhotonNumberSplitting):
                multi = n_vec >= 2
                fwd_j = np.where(multi, n_vec - 1, n_vec)
                fwd_p = np.where(multi, pns_t, np.where(n_vec == 1, pns_s, 0.0))
                ek = multi.astype(np.int32)
                add(k, a, n_vec, fwd_j, a, 0, ek, w * pn * fwd_p)
                add(k, a, n_vec, zeros, a, 0, ek, w * pn * (1 - fwd_p))
            elif isinstance(eve, BeamSplitting):
                f = eve.fraction
                q = (1 - f) * min(1.0, eta_ch / (1 - f))  # per photon: reaches Bob's receiver
                # P(j, E ≥ 1 | n) = P(j | n) − P(j, E = 0 | n); P(j, E = 0 | n) = C(n,j) q^j (1 − q − F)^(n−j).
                all_j = _binom_matrix(n_max, q)
                rest = 1 - f
                no_eve = _binom_matrix(n_max, q / rest) * (rest ** np.arange(n_max + 1))[:, None] if rest > 0 else 0
                eve_j = np.clip(all_j - no_eve, 0, None)
                add(k, a, n_col.ravel(), j_col.ravel(), a, 0, np.ones(all_j.size), w * (pn[:, None] * eve_j).ravel())
                add(k, a, n_col.ravel(), j_col.ravel(), a, 0, np.zeros(all_j.size), w * (pn[:, None] * no_eve).ravel())
            else:  # pragma: no cover - the union is closed
                raise TypeError(f"unknown eavesdropper {eve!r}")
    arrays = {f: np.concatenate(v) for f, v in cols.items()}
    arrays["prob"] /= arrays["prob"].sum()  # removes only the < 1e-18 Poisson tail
    return LightTable(**arrays)


def per_photon_probs(receiver: ReceiverParams, misalignment: float, beta: int, s: int, rel: int) -> tuple[float, float]:
    """(q_R, q_W): per-photon probabilities of a click in the detector of Alice's bit / the other."""
    eta_b = receiver.efficiency
    if rel == 1 or beta != s:
        return eta_b / 2, eta_b / 2
    return eta_b * (1 - misalignment), eta_b * misalignment


def click_pattern_probs(j: np.ndarray, q_r: float, q_w: float, p_dc: float) -> np.ndarray:
    """P(pattern | j photons) for patterns none, R, W, both (shape (len(j), 4)); exact, see module doc."""
    j = np.asarray(j, dtype=float)
    quiet = 1 - p_dc
    r_silent = quiet * np.power(1 - q_r, j)
    w_silent = quiet * np.power(1 - q_w, j)
    both_silent = quiet * quiet * np.power(max(1 - q_r - q_w, 0.0), j)
    out = np.empty((j.size, 4))
    out[:, PATTERN_NONE] = both_silent
    out[:, PATTERN_R] = w_silent - both_silent
    out[:, PATTERN_W] = r_silent - both_silent
    out[:, PATTERN_BOTH] = 1 - r_silent - w_silent + both_silent
    return np.clip(out, 0.0, None)


def event_table(params: DeviceParams, eve: Eavesdropper) -> EventTable:
    """Compose the light table with Bob's receiver into P(k, a, β, n, pattern, ek) per pulse."""
    return _event_table_cached(params, eve)


@lru_cache(maxsize=64)
def _event_table_cached(params: DeviceParams, eve: Eavesdropper) -> EventTable:
    light = light_table(params, eve)
    rec = params.receiver
    p_dc = rec.dark_count_per_detector
    n_cls = params.source.n_intensities
    n_max = int(light.n.max()) + 1
    # Accumulate into a dense array indexed by (k, a, β, n, pattern, ek), then keep non-zero cells.
    acc = np.zeros((n_cls, 2, 2, n_max, 4, 2))
    for beta, pb in ((0, rec.p_z), (1, 1 - rec.p_z)):
        for s in (0, 1):
            for rel in (0, 1):
                rows = (light.s == s) & (light.rel == rel)
                if not rows.any():
                    continue
                q_r, q_w = per_photon_probs(rec, params.channel.misalignment, beta, s, rel)
                pat = click_pattern_probs(light.j[rows], q_r, q_w, p_dc) * (pb * light.prob[rows])[:, None]
                kk, aa, nn, ee = light.k[rows], light.a[rows], light.n[rows], light.ek[rows]
                for p in range(4):
                    np.add.at(acc, (kk, aa, beta, nn, p, ee), pat[:, p])
    idx = np.nonzero(acc > 0)
    k, a, beta, n, pattern, ek = (np.asarray(i) for i in idx)
    return EventTable(
        k=k.astype(np.uint8),
        a=a.astype(np.uint8),
        beta=beta.astype(np.uint8),
        n=n.astype(np.int32),
        pattern=pattern.astype(np.uint8),
        ek=ek.astype(np.uint8),
        prob=acc[idx],
    )


def exact_class_statistics(params: DeviceParams, eve: Eavesdropper) -> dict[str, np.ndarray]:
    """Exact per-pulse detection and error probabilities of this simulator, per class and sifted basis.

    Returns arrays of shape (n_classes, 2) indexed [k, basis]: ``detect`` = P(click |
    class k, both chose ``basis``), ``error`` = P(Bob's bit ≠ Alice's bit and click | same),
    with double clicks counted as errors with probability 1/2; no dead time and no
    after-pulses. Used to check the simulator against its own exact model and to bound the
    (higher-order) difference from the Lim et al. 2014 first-order model.
    """
    t = event_table(params, eve)
    n_cls = params.source.n_intensities
    detect = np.zeros((n_cls, 2))
    error = np.zeros((n_cls, 2))
    norm = np.zeros((n_cls, 2))
    sift = t.a == t.beta
    np.add.at(norm, (t.k[sift], t.a[sift]), t.prob[sift])
    clicked = sift & (t.pattern != PATTERN_NONE)
    np.add.at(detect, (t.k[clicked], t.a[clicked]), t.prob[clicked])
    err_w = np.where(t.pattern == PATTERN_W, 1.0, np.where(t.pattern == PATTERN_BOTH, 0.5, 0.0))
    np.add.at(error, (t.k[clicked], t.a[clicked]), (t.prob * err_w)[clicked])
    with np.errstate(invalid="ignore", divide="ignore"):
        return {"detect": detect / norm, "error": error / norm}
