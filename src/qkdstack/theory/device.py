"""Expected detection statistics of the qkdstack device model.

These are the numbers the simulator (``qkdstack.physics``) must reproduce on average, and
the inputs of the expected finite-key rate. The model is the one used for the simulations
of Lim, Curty, Walenta, Xu, Zbinden, PRA 89, 022307 (2014), Sec. "Simulation" / Appendix:

* D_k = 1 − (1 − Y0)·exp(−η_sys·μ_k): probability that at least one of Bob's two
  detectors clicks on a pulse of intensity μ_k (Lim 2014 writes (1 − 2 p_dc) for (1 − Y0),
  the first-order form of (1 − p_dc)² for two detectors);
* R_k = D_k·(1 + p_ap): detection probability including after-pulses;
* e_k = Y0/2 + e_mis·(1 − exp(−η_sys·μ_k)) + p_ap·D_k/2: probability of an erroneous click
  (Lim 2014 writes p_dc for the Y0/2 term); dark counts and after-pulses are random bits;
* E_k = e_k / R_k: the quantum bit error rate of intensity class k.

With p_ap = 0 these reduce to Ma, Qi, Zhao, Lo, PRA 72, 012326 (2005), Eqs. (6)–(7)
(Q_μ = Y0 + 1 − e^(−ημ) to first order in Y0, E_μ Q_μ = e0 Y0 + e_d (1 − e^(−ημ)), e0 = 1/2).

Conventions: the key basis is Z, the test basis X. Alice picks Z with probability
``source.p_z``, Bob with ``receiver.p_z``; a pulse is sifted into a basis when both chose
it. The detection probability does not depend on the basis (basis-independent detector
efficiencies), so expected sifted counts factor into N·p_k·(basis probabilities)·R_k.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from qkdstack.errors import ConfigError
from qkdstack.physics.params import DeviceParams


def _mu(params: DeviceParams, k: int) -> float:
    mus = params.source.intensities
    if not isinstance(k, int) or not 0 <= k < len(mus):
        raise ConfigError(f"intensity class k must be an integer in [0, {len(mus) - 1}], got {k!r}")
    return mus[k]


def click_probability(params: DeviceParams, k: int) -> float:
    """D_k = 1 − (1 − Y0)·exp(−η_sys μ_k), Lim et al. 2014 simulation model (no after-pulses)."""
    mu = _mu(params, k)
    y0 = params.receiver.dark_count
    return 1.0 - (1.0 - y0) * math.exp(-params.eta_sys * mu)


def expected_detection_prob(params: DeviceParams, k: int) -> float:
    """R_k = D_k (1 + p_ap): probability that Bob registers a click on a pulse of class k.

    Lim, Curty, Walenta, Xu, Zbinden, PRA 89, 022307 (2014), simulation model. This is the
    gain Q_μ of Ma et al. 2005, Eq. (6), extended by after-pulses.
    """
    return click_probability(params, k) * (1.0 + params.receiver.afterpulse)


def expected_error_prob(params: DeviceParams, k: int) -> float:
    """e_k = Y0/2 + e_mis (1 − exp(−η_sys μ_k)) + p_ap D_k / 2: probability of an erroneous click.

    Lim et al. 2014 simulation model (their p_dc is our Y0/2); equals E_μ Q_μ of Ma et al.
    2005, Eq. (7), when p_ap = 0.
    """
    mu = _mu(params, k)
    y0 = params.receiver.dark_count
    d = click_probability(params, k)
    return (
        y0 / 2
        + params.channel.misalignment * (1.0 - math.exp(-params.eta_sys * mu))
        + params.receiver.afterpulse * d / 2
    )


def expected_qber(params: DeviceParams, k: int) -> float:
    """E_k = e_k / R_k: expected quantum bit error rate of intensity class k (either basis).

    Lim et al. 2014 simulation model. Returns 0.5 if R_k = 0 (no clicks: a random bit).
    """
    r = expected_detection_prob(params, k)
    if r <= 0:
        return 0.5
    return expected_error_prob(params, k) / r


@dataclass(frozen=True)
class ExpectedCounts:
    """Expected sifted detections and errors per intensity class for a number of pulses.

    ``key_counts[k]`` (basis Z), ``test_counts[k]`` (basis X), ``key_errors[k]`` and
    ``test_errors[k]`` are expectations (floats), in intensity order of the source.
    """

    pulses: float
    intensities: tuple[float, ...]
    intensity_probs: tuple[float, ...]
    key_counts: tuple[float, ...]
    test_counts: tuple[float, ...]
    key_errors: tuple[float, ...]
    test_errors: tuple[float, ...]

    @property
    def key_total(self) -> float:
        """n_Z = Σ_k n_Z,k: expected key-basis sifted detections."""
        return sum(self.key_counts)

    @property
    def test_total(self) -> float:
        """n_X = Σ_k n_X,k: expected test-basis sifted detections."""
        return sum(self.test_counts)

    @property
    def key_qber(self) -> float:
        """Expected QBER of the whole key basis (all intensities), 0.5 without detections."""
        return sum(self.key_errors) / self.key_total if self.key_total > 0 else 0.5


def expected_sifted_counts(params: DeviceParams, pulses: float) -> ExpectedCounts:
    """Expected n_Z,k, n_X,k and error counts for ``pulses`` pulses sent.

    n_Z,k = N p_k p_Z^A p_Z^B R_k and n_X,k = N p_k (1 − p_Z^A)(1 − p_Z^B) R_k, errors
    m = n E_k (Lim et al. 2014: "n_X,k = N p_k q_x² R_k" in their letters). p_Z^A is
    ``params.source.p_z`` and p_Z^B is ``params.receiver.p_z``.
    """
    if not (pulses >= 0 and math.isfinite(pulses)):
        raise ConfigError(f"pulses must be a finite number ≥ 0, got {pulses!r}")
    src = params.source
    pa, pb = src.p_z, params.receiver.p_z
    key, test, key_err, test_err = [], [], [], []
    for k, pk in enumerate(src.intensity_probs):
        r = expected_detection_prob(params, k)
        e = expected_qber(params, k)
        nz = pulses * pk * pa * pb * r
        nx = pulses * pk * (1 - pa) * (1 - pb) * r
        key.append(nz)
        test.append(nx)
        key_err.append(nz * e)
        test_err.append(nx * e)
    return ExpectedCounts(
        pulses=float(pulses),
        intensities=src.intensities,
        intensity_probs=src.intensity_probs,
        key_counts=tuple(key),
        test_counts=tuple(test),
        key_errors=tuple(key_err),
        test_errors=tuple(test_err),
    )


def pulses_for_key_block(params: DeviceParams, key_block: float) -> float:
    """Number of pulses N for which the expected key-basis sifted count n_Z equals ``key_block``.

    Lim et al. 2014 fix the block by n_X (their key basis; our Z) and derive N from it.
    """
    per_pulse = expected_sifted_counts(params, 1.0).key_total
    if per_pulse <= 0:
        return math.inf
    return key_block / per_pulse
