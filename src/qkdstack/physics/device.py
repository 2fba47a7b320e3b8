"""The QKD device interface and the simulated decoy-state BB84 device (combined fast path).

:class:`QKDDevice` is what post-processing needs from any device, simulated or real: run a
frame of N pulses and hand over a :class:`~qkdstack.physics.records.Frame` (Alice's record,
Bob's detection record, and for a simulator the ground-truth oracle).

:class:`SimulatedDevice` samples the frame event by event (see
:mod:`qkdstack.physics.sampling`) from the exact per-pulse table of
:mod:`qkdstack.physics.optics`: the cost is proportional to the number of detections, not
to N. Alice's record is sparse: it holds the settings of the pulses Bob registered (the
only ones post-processing will look up); all other pulses were sent with settings that no
one ever reads, drawn implicitly. Dead time and after-pulses are applied by
:mod:`qkdstack.physics.detectors`.
"""

from __future__ import annotations

from typing import Literal, Protocol, runtime_checkable

import numpy as np

from qkdstack.errors import ConfigError
from qkdstack.physics.detectors import dead_gates, resolve_clicks
from qkdstack.physics.eve import Eavesdropper, NoEve
from qkdstack.physics.optics import PATTERN_NONE, EventTable, event_table
from qkdstack.physics.params import DeviceParams
from qkdstack.physics.records import AliceRecord, DetectionRecord, Frame, SimulatorGroundTruth
from qkdstack.physics.sampling import DetectionSampler, new_key, sample_rows

AfterpulseMode = Literal["same-class", "next-gate"]


@runtime_checkable
class QKDDevice(Protocol):
    """A QKD device as post-processing sees it (hardware drivers implement this too)."""

    params: DeviceParams

    def run_frame(self, n_pulses: int) -> Frame:
        """Send ``n_pulses`` pulses and return both parties' records of them."""
        ...


def check_pulses(n_pulses: int) -> int:
    """Validate a frame size (a positive integer below 2^62)."""
    if isinstance(n_pulses, bool) or not isinstance(n_pulses, int | np.integer) or not 0 < n_pulses < 2**62:
        raise ConfigError(f"pulses must be a positive integer below 2^62, got {n_pulses!r}")
    return int(n_pulses)


def check_afterpulse_mode(mode: str) -> AfterpulseMode:
    if mode not in ("same-class", "next-gate"):
        raise ConfigError(f"afterpulse_mode must be 'same-class' or 'next-gate', got {mode!r}")
    return mode  # type: ignore[return-value]


def materialise_quiet_pulses(quiet: EventTable, classes: np.ndarray, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Settings of pulses known to have produced no primary click (the gates of pure after-pulses).

    Entry i is drawn from P(a, β, n, ek | class ``classes[i]``, no primary click), with a
    fresh uniform bit for Alice. Returns columns k, a, beta, n, ek, bit.
    """
    rows = np.empty(classes.size, np.int32)
    for c in np.unique(classes):
        sel = classes == c
        cand = np.nonzero(quiet.k == c)[0]
        rows[sel] = cand[sample_rows(quiet.prob[cand], int(sel.sum()), rng)]
    return _columns(quiet, rows, rng)


def _columns(table: EventTable, rows: np.ndarray, rng: np.random.Generator) -> dict[str, np.ndarray]:
    return {
        "k": table.k[rows],
        "a": table.a[rows],
        "beta": table.beta[rows],
        "n": table.n[rows],
        "ek": table.ek[rows],
        "bit": rng.integers(0, 2, rows.size, dtype=np.uint8),
    }


def build_frame(
    n_pulses: int,
    index: np.ndarray,
    alice: dict[str, np.ndarray],
    bob_basis: np.ndarray,
    bob_bit: np.ndarray,
    eve_knows: np.ndarray,
    photon_number: np.ndarray,
) -> Frame:
    """Assemble the records of a frame from per-detection columns (all in pulse order)."""
    pulse_index = index if index.dtype == np.uint64 else index.astype(np.uint64)
    return Frame(
        alice=AliceRecord(
            n_pulses=n_pulses,
            pulse_index=pulse_index,
            intensity=alice["k"].astype(np.uint8, copy=False),
            basis=alice["a"].astype(np.uint8, copy=False),
            bit=alice["bit"].astype(np.uint8, copy=False),
        ),
        bob=DetectionRecord(
            n_pulses=n_pulses,
            pulse_index=pulse_index,
            basis=bob_basis.astype(np.uint8, copy=False),
            bit=bob_bit.astype(np.uint8, copy=False),
        ),
        ground_truth=SimulatorGroundTruth(
            eve_knows=eve_knows.astype(bool, copy=False), photon_number=photon_number.astype(np.uint16, copy=False)
        ),
    )


class SimulatedDevice:
    """Simulated decoy-state BB84 link (source, fibre, optional Eve, receiver) in one fast pass.

    ``seed`` seeds a ``numpy.random.Generator`` (or pass a Generator); the same seed and
    parameters give the same frames. ``afterpulse_mode`` (see
    :mod:`qkdstack.physics.detectors`): ``"same-class"`` (default; matches the per-class
    model of Lim et al. 2014) or ``"next-gate"`` (physical; what the split form does).
    """

    def __init__(
        self,
        params: DeviceParams,
        eve: Eavesdropper | None = None,
        seed: int | np.random.Generator | None = None,
        afterpulse_mode: AfterpulseMode = "same-class",
    ) -> None:
        self.params = params
        self.eve = eve if eve is not None else NoEve()
        self.afterpulse_mode = check_afterpulse_mode(afterpulse_mode)
        self.rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
        table = event_table(params, self.eve)
        self._events = table.select(table.pattern != PATTERN_NONE)
        self._quiet = table.select(table.pattern == PATTERN_NONE)
        self._sampler = DetectionSampler(self._events)

    @property
    def detection_probability(self) -> float:
        """Probability that a pulse gives a primary click (before dead time and after-pulses)."""
        return float(self._events.prob.sum())

    def run_frame(self, n_pulses: int) -> Frame:
        """Simulate ``n_pulses`` pulses and return the frame (cost ∝ detections)."""
        n_pulses = check_pulses(n_pulses)
        rec = self.params.receiver
        cols = self._sampler.sample(n_pulses, self.rng)
        gates = dead_gates(rec.dead_time_s, self.params.source.rep_rate_hz)
        if rec.afterpulse == 0 and gates == 0:
            return build_frame(n_pulses, cols["index"], cols, cols["beta"], cols["bob"], cols["ek"], cols["n"])
        same_class = self.afterpulse_mode == "same-class"
        out_index, bob_bit, src, out_cls = resolve_clicks(
            cols["index"].view(np.int64),
            cols["mask"],
            cols["k"],
            n_pulses,
            gates,
            rec.afterpulse,
            self.params.source.intensity_probs if same_class else None,
            new_key(self.rng),
        )
        take = np.maximum(src, 0)
        merged = {name: cols[name][take] for name in ("k", "a", "beta", "n", "ek", "bit")}
        pure_ap = np.nonzero(src < 0)[0]
        if pure_ap.size:
            classes = out_cls[pure_ap] if same_class else self._quiet_classes(pure_ap.size)
            extra = materialise_quiet_pulses(self._quiet, classes, self.rng)
            for name, col in extra.items():
                merged[name][pure_ap] = col
        return build_frame(n_pulses, out_index, merged, merged["beta"], bob_bit, merged["ek"], merged["n"])

    def _quiet_classes(self, size: int) -> np.ndarray:
        """Classes of quiet pulses at next-gate after-pulses: P(k | no primary click)."""
        q = self._quiet
        n_cls = self.params.source.n_intensities
        pk = np.bincount(q.k, weights=q.prob, minlength=n_cls)
        return self.rng.choice(n_cls, size=size, p=pk / pk.sum()).astype(np.uint8)
