"""What a QKD device hands to post-processing: Alice's and Bob's records of a frame.

The layout is that of real hardware: Alice knows, for each pulse index she sent, the
intensity class, basis and bit; Bob knows, for each pulse index at which he registered a
click, the basis he measured in and the bit. A frame of 10^10 pulses cannot be stored
pulse by pulse, so :class:`AliceRecord` is *sparse*: it holds Alice's settings for the
pulses the device materialised (a superset of the pulses Bob detected; real hardware
would hold all of them) and answers look-ups by pulse index. Post-processing only ever
looks up the indices Bob announces.

Ground truth that no party could know (which bits Eve learnt) lives only in
:class:`SimulatorGroundTruth`, which tests use as an explicitly named oracle.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numba import njit

from qkdstack.errors import ChannelError


def _check_sorted_unique(name: str, index: np.ndarray) -> None:
    if index.size > 1 and not bool(np.all(index[1:] > index[:-1])):
        raise ValueError(f"{name} pulse indices must be strictly increasing")


@njit(cache=True, nogil=True)
def _gather_sorted(
    recorded: np.ndarray, wanted: np.ndarray, intensity: np.ndarray, basis: np.ndarray, bit: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """Settings at ``wanted`` (strictly increasing) from the sorted ``recorded`` indices, in one merge pass.

    Each wanted index is found by galloping forward from the previous match (1, 2, 4, ...
    entries, then a binary search), so the pass costs O(n log(m / n)) for n wanted out of m
    recorded: linear when Alice recorded little more than Bob's detections, logarithmic per
    detection when she recorded every pulse. Returns the three columns and a status: -1 on
    success, ``i`` if ``wanted[i]`` is not recorded, ``-2`` if ``wanted`` is not strictly increasing.
    """
    n = wanted.size
    m = recorded.size
    out_k = np.empty(n, np.uint8)
    out_a = np.empty(n, np.uint8)
    out_b = np.empty(n, np.uint8)
    j = 0
    for i in range(n):
        x = wanted[i]
        if i > 0 and x <= wanted[i - 1]:
            return out_k, out_a, out_b, -2
        if j < m and recorded[j] < x:
            lo = j  # recorded[lo] < x
            step = 1
            while j + step < m and recorded[j + step] < x:
                lo = j + step
                step *= 2
            hi = min(j + step, m)  # recorded[hi] >= x, or hi == m
            while hi - lo > 1:
                mid = (lo + hi) // 2
                if recorded[mid] < x:
                    lo = mid
                else:
                    hi = mid
            j = hi
        if j == m or recorded[j] != x:
            return out_k, out_a, out_b, i
        out_k[i] = intensity[j]
        out_a[i] = basis[j]
        out_b[i] = bit[j]
        j += 1
    return out_k, out_a, out_b, -1


@dataclass(frozen=True, repr=False)
class AliceRecord:
    """Alice's settings per pulse: intensity class (0 = signal), basis (0 = Z, 1 = X), bit."""

    n_pulses: int
    pulse_index: np.ndarray  # uint64, strictly increasing
    intensity: np.ndarray  # uint8 class index into SourceParams.intensities
    basis: np.ndarray  # uint8
    bit: np.ndarray  # uint8

    def __post_init__(self) -> None:
        _check_sorted_unique("Alice's", self.pulse_index)

    def lookup(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(intensity, basis, bit) at the given pulse indices, all of which must be recorded."""
        indices = np.ascontiguousarray(indices, dtype=np.uint64)
        columns = (self.intensity, self.basis, self.bit)
        recorded = self.pulse_index
        if (
            indices.ndim == 1
            and recorded.size
            and recorded.dtype == np.uint64
            and recorded.ndim == 1
            and all(c.dtype == np.uint8 and c.shape == recorded.shape for c in columns)
        ):
            intensity, basis, bit, status = _gather_sorted(recorded, indices, *columns)
            if status == -1:
                return intensity, basis, bit
            if status >= 0:
                raise ChannelError("peer announced pulse indices that Alice did not send")
        # Unsorted look-ups (and other column dtypes) take the general path.
        pos = np.searchsorted(self.pulse_index, indices)
        pos_clipped = np.minimum(pos, max(self.pulse_index.size - 1, 0))
        if self.pulse_index.size == 0 or not np.array_equal(self.pulse_index[pos_clipped], indices):
            raise ChannelError("peer announced pulse indices that Alice did not send")
        return self.intensity[pos], self.basis[pos], self.bit[pos]

    def __repr__(self) -> str:
        return f"AliceRecord(n_pulses={self.n_pulses}, recorded={self.pulse_index.size})"


@dataclass(frozen=True, repr=False)
class DetectionRecord:
    """Bob's clicks: pulse index, measurement basis and bit (double clicks already squashed)."""

    n_pulses: int
    pulse_index: np.ndarray  # uint64, strictly increasing
    basis: np.ndarray  # uint8
    bit: np.ndarray  # uint8

    def __post_init__(self) -> None:
        _check_sorted_unique("Bob's", self.pulse_index)

    def __len__(self) -> int:
        return int(self.pulse_index.size)

    def __repr__(self) -> str:
        return f"DetectionRecord(n_pulses={self.n_pulses}, detections={self.pulse_index.size})"


@dataclass(frozen=True, repr=False)
class SimulatorGroundTruth:
    """Oracle for tests: what only the simulator knows about a frame.

    ``eve_knows`` marks, per entry of Bob's detection record, whether Eve learnt the bit
    Bob registered; ``photon_number`` is the photon number Alice's pulse had.
    """

    eve_knows: np.ndarray  # bool, aligned with DetectionRecord.pulse_index
    photon_number: np.ndarray  # uint16 (or int), aligned with DetectionRecord.pulse_index

    def __repr__(self) -> str:
        return f"SimulatorGroundTruth(detections={self.eve_knows.size})"


@dataclass(frozen=True, repr=False)
class Frame:
    """One frame from a device: both parties' records plus the simulator's oracle (if simulated)."""

    alice: AliceRecord
    bob: DetectionRecord
    ground_truth: SimulatorGroundTruth | None = None

    def __repr__(self) -> str:
        return f"Frame({self.alice!r}, {self.bob!r})"
