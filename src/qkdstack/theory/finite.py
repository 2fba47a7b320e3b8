"""Finite-key secret length of decoy-state BB84: Lim, Curty, Walenta, Xu, Zbinden (2014).

C. C. W. Lim et al., "Concise security bounds for practical decoy-state quantum key
distribution", PRA 89, 022307 (2014), Eqs. (1)–(5); "Lim 2014" below.

**Naming.** Lim 2014 call the key basis X and the test basis Z. In qkdstack the key basis is
Z and the test basis is X, so this module names quantities by *role*: ``key`` (Lim's X) and
``test`` (Lim's Z). Lim's s_X,0, s_X,1 are our ``s_key_0``, ``s_key_1``; their s_Z,1, v_Z,1 our
``s_test_1``, ``v_test_1``; their φ_X our ``phase_error``.

**Protocol assumptions** (Lim 2014, Sec. II): three intensities μ1 > μ2 + μ3 and μ2 > μ3 ≥ 0
chosen with probabilities p_k independently of the basis; all three intensities contribute to
the key; the detection probability does not depend on Bob's basis. The condition μ1 > μ2 + μ3
is what makes the bound on multi-photon terms in Eq. (3) valid (Appendix A.2 uses
μ2^n − μ3^n ≤ (μ2² − μ3²) μ1^(n−2) for n ≥ 2) and makes its denominator
μ1(μ2 − μ3) − μ2² + μ3² = (μ2 − μ3)(μ1 − μ2 − μ3) positive; μ2 > μ3 makes Eqs. (2) and (4)
well defined.

**Formulas** (ε = ε_sec, n = total counts of the basis concerned):

* Hoeffding-corrected counts: n±_k = (e^(μ_k)/p_k) [n_k ± sqrt(n/2 · ln(21/ε))], and the same
  for errors with m = Σ_k m_k;
* τ_j = Σ_k p_k e^(−μ_k) μ_k^j / j!: probability that Alice sends j photons;
* Eq. (2): s_0 ≥ τ0 (μ2 n−_3 − μ3 n+_2)/(μ2 − μ3);
* Eq. (3): s_1 ≥ τ1 μ1 [n−_2 − n+_3 − (μ2² − μ3²)/μ1² (n+_1 − s_0/τ0)] / [μ1(μ2 − μ3) − μ2² + μ3²];
* Eq. (4): v_test,1 ≤ τ1 (m+_2 − m−_3)/(μ2 − μ3);
* Eq. (5): φ ≤ v/s_test,1 + γ(ε, v/s_test,1, s_test,1, s_key,1), with
  γ(a, b, c, d) = sqrt[(c + d)(1 − b) b/(c d ln 2) · log2((c + d)/(c d (1 − b) b) · 21²/a²)];
* Eq. (1): ℓ = ⌊s_key,0 + s_key,1 − s_key,1 h(φ) − λ_EC − 6 log2(21/ε_sec) − log2(2/ε_cor)⌋.

λ_EC is the number of bits the error correction disclosed (Lim 2014). The post-processing
passes the *measured* leakage λ of :mod:`qkdstack.protocol.round`: every key-dependent bit
that crossed the channel during error correction and verification, in both directions —
Alice's Cascade parities, Bob's decision bits, the verification tags and the key-error count.
Eq. (1) also keeps its own log2(2/ε_cor) term for the verification hash, so the tag is
counted twice: deliberately, conservative by ≈ 128 + log2(2/ε_cor) bits per block (see
:func:`lim2014_secret_length`).

**Degenerate inputs.** Lower bounds that come out negative are replaced by 0 (a count is
never negative); v_test,1 is clipped to [0, s_test,1]. Without single-photon events in either
basis, or with φ ≥ 1/2, no key can be certified: the length is 0. Nothing here returns NaN.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from qkdstack.errors import ConfigError
from qkdstack.theory.entropy import binary_entropy

_LN2 = math.log(2)


def _check_eps(name: str, eps: float) -> None:
    if not isinstance(eps, int | float) or math.isnan(eps) or not 0 < eps < 1:
        raise ConfigError(f"{name} must lie in (0, 1), got {eps!r}")


def _as_tuple(name: str, values: Any, length: int) -> tuple[float, ...]:
    try:
        out = tuple(float(v) for v in values)
    except (TypeError, ValueError):
        raise ConfigError(f"{name} must be a sequence of {length} numbers, got {values!r}") from None
    if len(out) != length:
        raise ConfigError(f"{name} must have {length} entries (one per intensity), got {len(out)}")
    for i, v in enumerate(out):
        if not math.isfinite(v) or v < 0:
            raise ConfigError(f"{name}[{i}] must be a finite number ≥ 0, got {v}")
    return out


@dataclass(frozen=True)
class DecoyCounts:
    """Sifted counts per intensity class, the input of Lim 2014's bounds.

    ``intensities`` μ1 > μ2 > μ3 ≥ 0 (mean photon numbers, descending) with μ1 > μ2 + μ3;
    ``probabilities`` p_k with which Alice chose them (summing to 1);
    ``key_counts`` n_k: sifted detections per intensity in the key basis (qkdstack: Z);
    ``test_counts`` and ``test_errors``: sifted detections and bit errors per intensity in the
    test basis (qkdstack: X). Counts may be integers (measured) or floats (expected values).
    Invalid values raise :class:`ConfigError` naming the field.
    """

    intensities: tuple[float, ...]
    probabilities: tuple[float, ...]
    key_counts: tuple[float, ...]
    test_counts: tuple[float, ...]
    test_errors: tuple[float, ...]

    def __post_init__(self) -> None:
        mus = _as_tuple("intensities", self.intensities, 3)
        object.__setattr__(self, "intensities", mus)
        probs = _as_tuple("probabilities", self.probabilities, 3)
        object.__setattr__(self, "probabilities", probs)
        for name in ("key_counts", "test_counts", "test_errors"):
            object.__setattr__(self, name, _as_tuple(name, getattr(self, name), 3))
        mu1, mu2, mu3 = mus
        if not (mu1 > mu2 > mu3 >= 0):
            raise ConfigError(f"intensities must be descending, μ1 > μ2 > μ3 ≥ 0, got {mus}")
        if not mu1 > mu2 + mu3:
            raise ConfigError(f"intensities must satisfy μ1 > μ2 + μ3 for the Lim 2014 bounds (Eq. (3)), got {mus}")
        if any(p <= 0 for p in probs):
            raise ConfigError(f"probabilities must all be > 0, got {probs}")
        if abs(sum(probs) - 1) > 1e-9:
            raise ConfigError(f"probabilities must sum to 1, got {sum(probs):.6g}")
        for k, (m, n) in enumerate(zip(self.test_errors, self.test_counts, strict=True)):
            if m > n:
                raise ConfigError(f"test_errors[{k}] ({m}) cannot exceed test_counts[{k}] ({n})")

    @property
    def n_key(self) -> float:
        """n_key = Σ_k n_key,k (Lim's n_X, the block size)."""
        return sum(self.key_counts)

    @property
    def n_test(self) -> float:
        """n_test = Σ_k n_test,k (Lim's n_Z)."""
        return sum(self.test_counts)

    @property
    def m_test(self) -> float:
        """m_test = Σ_k m_test,k (Lim's m_Z)."""
        return sum(self.test_errors)


@dataclass(frozen=True)
class DecoyBounds:
    """Lim 2014 Eqs. (2)–(5) evaluated on a :class:`DecoyCounts`, with intermediate values."""

    eps_sec: float
    finite: bool
    tau0: float
    tau1: float
    delta_key: float
    """sqrt(n_key/2 ln(21/ε_sec)): Hoeffding deviation of the key-basis counts (0 if not finite)."""
    delta_test: float
    delta_errors: float
    s_key_0: float
    """Eq. (2) on the key basis: lower bound on vacuum events (clipped at 0)."""
    s_key_1: float
    """Eq. (3) on the key basis: lower bound on single-photon events (clipped at 0)."""
    s_test_0: float
    s_test_1: float
    v_test_1: float
    """Eq. (4): upper bound on single-photon bit errors in the test basis."""
    phase_error_test: float
    """v_test,1 / s_test,1 (0.5 when s_test,1 = 0)."""
    gamma: float
    """γ(ε_sec, v/s, s_test,1, s_key,1) of Eq. (5) (0 if not finite)."""
    phase_error: float
    """Eq. (5): upper bound φ on the single-photon phase-error rate of the key, capped at 0.5."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def hoeffding_counts(
    counts: tuple[float, ...], probabilities: tuple[float, ...], intensities: tuple[float, ...], delta: float
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(n−_k, n+_k) = (e^(μ_k)/p_k)(n_k ∓ δ) for every k (Lim 2014, after Eq. (2))."""
    minus = tuple(math.exp(mu) / p * (n - delta) for n, p, mu in zip(counts, probabilities, intensities, strict=True))
    plus = tuple(math.exp(mu) / p * (n + delta) for n, p, mu in zip(counts, probabilities, intensities, strict=True))
    return minus, plus


def hoeffding_delta(total: float, eps_sec: float) -> float:
    """δ(n, ε) = sqrt(n/2 · ln(21/ε_sec)) (Lim 2014, Eq. (A1) with ε1 = ε_sec/21)."""
    return math.sqrt(max(total, 0.0) / 2 * math.log(21 / eps_sec))


def tau(intensities: tuple[float, ...], probabilities: tuple[float, ...], n: int) -> float:
    """τ_n = Σ_k p_k e^(−μ_k) μ_k^n / n!: probability that Alice sends n photons (Lim 2014, Eq. (2))."""
    return sum(p * math.exp(-mu) * mu**n / math.factorial(n) for mu, p in zip(intensities, probabilities, strict=True))


def _vacuum_bound(mus: tuple[float, ...], minus: tuple[float, ...], plus: tuple[float, ...], tau0: float) -> float:
    """Eq. (2): s_0 ≥ τ0 (μ2 n−_3 − μ3 n+_2)/(μ2 − μ3), clipped at 0."""
    _, mu2, mu3 = mus
    return max(tau0 * (mu2 * minus[2] - mu3 * plus[1]) / (mu2 - mu3), 0.0)


def _single_bound(
    mus: tuple[float, ...], minus: tuple[float, ...], plus: tuple[float, ...], s0: float, tau0: float, tau1: float
) -> float:
    """Eq. (3): s_1 ≥ τ1 μ1 [n−_2 − n+_3 − (μ2² − μ3²)/μ1² (n+_1 − s_0/τ0)]/[μ1(μ2 − μ3) − μ2² + μ3²]."""
    mu1, mu2, mu3 = mus
    denom = mu1 * (mu2 - mu3) - mu2 * mu2 + mu3 * mu3
    inner = minus[1] - plus[2] - (mu2 * mu2 - mu3 * mu3) / (mu1 * mu1) * (plus[0] - s0 / tau0)
    return max(tau1 * mu1 * inner / denom, 0.0)


def gamma(a: float, b: float, c: float, d: float) -> float:
    """γ(a, b, c, d) of Lim 2014 Eq. (5) (after Fung, Ma, Chau, PRA 81, 012318 (2010)).

    sqrt[(c + d)(1 − b) b/(c d ln 2) · log2((c + d)/(c d (1 − b) b) · 21²/a²)], with a = ε_sec,
    b the observed phase-error rate, c = s_test,1 and d = s_key,1. Returns 0 for b ∈ {0, 1}
    (the limit of the formula) and +inf if c or d is 0 (nothing can be certified).
    """
    if c <= 0 or d <= 0:
        return math.inf
    if b <= 0 or b >= 1:
        return 0.0
    # log2 of the argument computed term by term: a² underflows for ε_sec below ~1e-160.
    log_arg = math.log2(c + d) - math.log2(c) - math.log2(d) - math.log2((1 - b) * b) + 2 * math.log2(21 / a)
    if log_arg <= 0:
        return 0.0
    return math.sqrt((c + d) * (1 - b) * b / (c * d * _LN2) * log_arg)


def lim2014_bounds(counts: DecoyCounts, eps_sec: float, *, finite: bool = True) -> DecoyBounds:
    """Lim 2014 Eqs. (2)–(5) on the given counts: s_key,0, s_key,1, s_test,1, v_test,1, φ.

    With ``finite=False`` the Hoeffding deviations and γ are set to 0: the asymptotic limit
    used for the dashed curve of Lim 2014 Fig. 1 (counts are then expected values).
    ``eps_sec`` must lie in (0, 1) (it is used only when ``finite``).
    """
    _check_eps("eps_sec", eps_sec)
    mus, probs = counts.intensities, counts.probabilities
    tau0, tau1 = tau(mus, probs, 0), tau(mus, probs, 1)
    if finite:
        d_key = hoeffding_delta(counts.n_key, eps_sec)
        d_test = hoeffding_delta(counts.n_test, eps_sec)
        d_err = hoeffding_delta(counts.m_test, eps_sec)
    else:
        d_key = d_test = d_err = 0.0
    k_minus, k_plus = hoeffding_counts(counts.key_counts, probs, mus, d_key)
    t_minus, t_plus = hoeffding_counts(counts.test_counts, probs, mus, d_test)
    e_minus, e_plus = hoeffding_counts(counts.test_errors, probs, mus, d_err)

    s_key_0 = _vacuum_bound(mus, k_minus, k_plus, tau0)
    s_key_1 = _single_bound(mus, k_minus, k_plus, s_key_0, tau0, tau1)
    s_test_0 = _vacuum_bound(mus, t_minus, t_plus, tau0)
    s_test_1 = _single_bound(mus, t_minus, t_plus, s_test_0, tau0, tau1)
    _, mu2, mu3 = mus
    v_test_1 = min(max(tau1 * (e_plus[1] - e_minus[2]) / (mu2 - mu3), 0.0), s_test_1)  # Eq. (4)

    if s_test_1 > 0:
        b = v_test_1 / s_test_1
        g = gamma(eps_sec, b, s_test_1, s_key_1) if finite else 0.0
        phase = min(b + g, 0.5)
    else:
        b, g, phase = 0.5, (math.inf if finite else 0.0), 0.5
    if s_key_1 <= 0:
        phase = 0.5
    return DecoyBounds(
        eps_sec=eps_sec,
        finite=finite,
        tau0=tau0,
        tau1=tau1,
        delta_key=d_key,
        delta_test=d_test,
        delta_errors=d_err,
        s_key_0=s_key_0,
        s_key_1=s_key_1,
        s_test_0=s_test_0,
        s_test_1=s_test_1,
        v_test_1=v_test_1,
        phase_error_test=b,
        gamma=g,
        phase_error=phase,
    )


@dataclass(frozen=True)
class FiniteKeyResult:
    """The secret length of Lim 2014 Eq. (1), every term recorded (the key block's proof)."""

    length: int
    """ℓ in bits: ⌊raw_length⌋ clipped at 0."""
    raw_length: float
    """s_key,0 + s_key,1 (1 − h(φ)) − λ_EC − 6 log2(21/ε_sec) − log2(2/ε_cor), before ⌊·⌋ and clipping."""
    s_key_0: float
    s_key_1: float
    phase_error: float
    h_phase_error: float
    leakage_bits: float
    """λ: bits disclosed by error correction (measured by a round: both directions, verification tags
    included; or f_EC n h(e) for a prediction)."""
    pa_cost_bits: float
    """6 log2(21/ε_sec)."""
    verification_bits: float
    """log2(2/ε_cor)."""
    eps_sec: float
    eps_cor: float
    n_key: float
    counts: DecoyCounts
    bounds: DecoyBounds
    reason: str | None = field(default=None)
    """Why the length is 0 (one sentence), or None when a key can be extracted."""

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict (floats, ints, strings, nested dicts; inf written as None)."""
        out = asdict(self)

        def clean(obj: Any) -> Any:
            if isinstance(obj, dict):
                return {k: clean(v) for k, v in obj.items()}
            if isinstance(obj, list | tuple):
                return [clean(v) for v in obj]
            if isinstance(obj, float) and not math.isfinite(obj):
                return None
            return obj

        return clean(out)


def lim2014_secret_length(
    counts: DecoyCounts, leakage_bits: float, eps_sec: float, eps_cor: float, *, finite: bool = True
) -> FiniteKeyResult:
    """Secret key length ℓ of Lim 2014 Eq. (1) from (measured) counts and leakage.

    ℓ = ⌊s_key,0 + s_key,1 − s_key,1 h(φ) − λ_EC − 6 log2(21/ε_sec) − log2(2/ε_cor)⌋, clipped at 0,
    with s_key,0, s_key,1 and φ from :func:`lim2014_bounds`. ``leakage_bits`` is λ_EC, the bits
    the error correction disclosed. The formula charges the verification hash by its own
    log2(2/ε_cor) term (Lim 2014, Sec. II step 5 and Eq. (1)); a distillation round passes, in
    addition, the verification tag bits it measured inside ``leakage_bits`` (together with both
    directions of Cascade and the key-error count), so the tag is counted twice — on purpose,
    conservative by a few hundred bits. The result is ε_sec-secret and ε_cor-correct.
    ``finite=False`` drops the finite-size terms (Hoeffding, γ, ε costs): the asymptotic
    limit, for comparison only.

    Invalid inputs (eps outside (0, 1), negative or non-finite leakage, bad counts) raise
    :class:`ConfigError`; degenerate but valid inputs (zero counts, φ ≥ 1/2) give length 0
    with ``reason`` set.
    """
    _check_eps("eps_sec", eps_sec)
    _check_eps("eps_cor", eps_cor)
    if not isinstance(leakage_bits, int | float) or not math.isfinite(leakage_bits) or leakage_bits < 0:
        raise ConfigError(f"leakage_bits must be a finite number ≥ 0, got {leakage_bits!r}")
    bounds = lim2014_bounds(counts, eps_sec, finite=finite)
    s0, s1, phi = bounds.s_key_0, bounds.s_key_1, bounds.phase_error
    h_phi = float(binary_entropy(phi))
    pa_cost = 6 * math.log2(21 / eps_sec) if finite else 0.0
    verify = math.log2(2 / eps_cor) if finite else 0.0
    raw = s0 + s1 * (1 - h_phi) - leakage_bits - pa_cost - verify
    length = max(math.floor(raw), 0) if math.isfinite(raw) else 0
    reason: str | None = None
    if length == 0:
        if counts.n_key <= 0:
            reason = "no key-basis detections"
        elif s1 <= 0:
            reason = "the decoy bounds certify no single-photon events in the key basis"
        elif bounds.s_test_1 <= 0:
            reason = "the decoy bounds certify no single-photon events in the test basis"
        elif phi >= 0.5:
            reason = "the single-photon phase-error bound reaches 1/2"
        else:
            reason = "the finite-key costs exceed the certified entropy"
    return FiniteKeyResult(
        length=int(length),
        raw_length=raw,
        s_key_0=s0,
        s_key_1=s1,
        phase_error=phi,
        h_phase_error=h_phi,
        leakage_bits=float(leakage_bits),
        pa_cost_bits=pa_cost,
        verification_bits=verify,
        eps_sec=eps_sec,
        eps_cor=eps_cor,
        n_key=counts.n_key,
        counts=counts,
        bounds=bounds,
        reason=reason,
    )
