"""The device split in two halves, for two node processes: Alice's transmitter and Bob's receiver.

What crosses from one half to the other is only what a fibre carries: :class:`Light`, the
pulses that reach the entrance of Bob's receiver with at least one photon, each with its
photon number and the polarisation state (basis, bit) the photons carry. Alice's classical
record never travels; Bob's receiver sees no intensity class.

* :class:`Transmitter` is Alice's source *and the fibre* (with the eavesdropper in it): only
  light that survives the fibre has to be materialised, so the transmitter samples it
  directly from the light table of :mod:`qkdstack.physics.optics` with the same event
  sampler as the combined device. Pulses from which no light arrived are materialised on
  demand (:meth:`Transmitter.alice_record`) from P(settings | no light), which is exact
  because Bob's dark counts and after-pulses on such pulses do not depend on Alice's
  settings.
* :class:`Receiver` is Bob: active basis choice, per-photon detection with η_Bob and
  misalignment (the same per-photon probabilities as the combined tables), dark counts
  per detector sampled over all N gates as a sparse Bernoulli process, then dead time,
  after-pulses (next-gate placement: a receiver cannot know Alice's intensity class) and
  squashing by :func:`qkdstack.physics.detectors.resolve_clicks`.

:class:`SplitDevice` chains the halves in one process behind the :class:`QKDDevice`
interface; its frames have the statistics of
``SimulatedDevice(..., afterpulse_mode="next-gate")``. It is slower than the combined fast
path (it materialises every pulse whose light reaches Bob, not only those that click).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numba import njit

from qkdstack.errors import ChannelError
from qkdstack.physics.detectors import dead_gates, resolve_clicks
from qkdstack.physics.device import check_pulses
from qkdstack.physics.eve import Eavesdropper, NoEve
from qkdstack.physics.optics import light_table, per_photon_probs
from qkdstack.physics.params import DeviceParams, ReceiverParams
from qkdstack.physics.records import AliceRecord, DetectionRecord, Frame, SimulatorGroundTruth
from qkdstack.physics.sampling import GOLDEN_GAMMA, new_key, sample_events, sample_rows, splitmix64, uniform_open0


@dataclass(frozen=True, repr=False)
class Light:
    """Pulses arriving at Bob's receiver with ≥ 1 photon: index, photon number, state basis and bit."""

    n_pulses: int
    pulse_index: np.ndarray  # uint64, strictly increasing
    photons: np.ndarray  # uint16, ≥ 1
    basis: np.ndarray  # uint8, basis the photons are polarised in
    bit: np.ndarray  # uint8, bit value they encode in that basis

    def __len__(self) -> int:
        return int(self.pulse_index.size)

    def __repr__(self) -> str:
        return f"Light(n_pulses={self.n_pulses}, arriving={self.pulse_index.size})"


class Transmitter:
    """Alice's transmitter and the fibre to Bob (with ``eve`` in it); keeps Alice's record to itself."""

    def __init__(
        self, params: DeviceParams, eve: Eavesdropper | None = None, seed: int | np.random.Generator | None = None
    ) -> None:
        self.params = params
        self.eve = eve if eve is not None else NoEve()
        self.rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
        table = light_table(params, self.eve)
        arrives = table.j > 0
        self._table = table
        self._arriving_rows = np.nonzero(arrives)[0]
        self._dark_rows = np.nonzero(~arrives)[0]
        self._n_pulses = 0
        self._store: dict[str, np.ndarray] = {}

    def emit(self, n_pulses: int) -> Light:
        """Send a frame of ``n_pulses`` pulses; return the light that reaches Bob's receiver."""
        n_pulses = check_pulses(n_pulses)
        t = self._table
        index, sub, bits = sample_events(n_pulses, t.prob[self._arriving_rows], self.rng)
        row = self._arriving_rows[sub]
        alice_bit = (bits & 1).astype(np.uint8)
        fresh = ((bits >> 1) & 1).astype(np.uint8)
        state_bit = np.where(t.rel[row] == 0, alice_bit, fresh).astype(np.uint8)
        self._n_pulses = n_pulses
        self._store = {
            "index": index.astype(np.uint64),
            "k": t.k[row],
            "a": t.a[row],
            "bit": alice_bit,
            "n": t.n[row].astype(np.uint16),
            "ek": t.ek[row].astype(bool),
        }
        return Light(
            n_pulses=n_pulses,
            pulse_index=index.astype(np.uint64),
            photons=t.j[row].astype(np.uint16),
            basis=t.s[row].astype(np.uint8),
            bit=state_bit,
        )

    def _materialise(self, indices: np.ndarray) -> None:
        """Draw settings for pulses of this frame not yet materialised (no light reached Bob from them)."""
        indices = _sorted_union(np.asarray(indices, dtype=np.uint64))
        if indices.size and int(indices[-1]) >= self._n_pulses:
            raise ChannelError("peer announced pulse indices beyond the frame Alice sent")
        new = indices[~np.isin(indices, self._store["index"], assume_unique=True)]
        if new.size == 0:
            return
        t = self._table
        row = self._dark_rows[sample_rows(t.prob[self._dark_rows], new.size, self.rng)]
        extra = {
            "index": new,
            "k": t.k[row],
            "a": t.a[row],
            "bit": self.rng.integers(0, 2, new.size, dtype=np.uint8),
            "n": t.n[row].astype(np.uint16),
            "ek": t.ek[row].astype(bool),
        }
        merged = {name: np.concatenate([self._store[name], extra[name]]) for name in self._store}
        order = np.argsort(merged["index"], kind="stable")
        self._store = {name: col[order] for name, col in merged.items()}

    def alice_record(self, announced: np.ndarray) -> AliceRecord:
        """Alice's record covering (at least) the pulse indices Bob announced."""
        self._materialise(announced)
        s = self._store
        return AliceRecord(self._n_pulses, s["index"], s["k"], s["a"], s["bit"])

    def ground_truth_oracle(self, detected: np.ndarray) -> SimulatorGroundTruth:
        """Oracle for tests: Eve's knowledge and photon numbers at Bob's detection indices."""
        self._materialise(detected)
        pos = np.searchsorted(self._store["index"], np.asarray(detected, dtype=np.uint64))
        return SimulatorGroundTruth(eve_knows=self._store["ek"][pos], photon_number=self._store["n"][pos])


def _sorted_union(*arrays: np.ndarray) -> np.ndarray:
    """Sorted distinct values of the concatenation (np.unique hashes; sorting is faster here)."""
    merged = np.sort(np.concatenate(arrays))
    if merged.size == 0:
        return merged
    keep = np.empty(merged.size, bool)
    keep[0] = True
    np.not_equal(merged[1:], merged[:-1], out=keep[1:])
    return merged[keep]


@njit(cache=True)
def _photon_clicks_kernel(
    photons: np.ndarray,
    state_basis: np.ndarray,
    state_bit: np.ndarray,
    bob_basis: np.ndarray,
    q: np.ndarray,
    key: np.uint64,
    out_mask: np.ndarray,
) -> None:
    """Per photon: detector of the state's bit with q[m, 0], the other with q[m, 1], else lost (m = bases differ)."""
    ctr = key
    for i in range(photons.size):
        m = 0 if bob_basis[i] == state_basis[i] else 1
        mask = 0
        for _ in range(photons[i]):
            ctr += GOLDEN_GAMMA
            u = uniform_open0(splitmix64(ctr))
            if u <= q[m, 0]:
                mask |= 1 << int(state_bit[i])
            elif u <= q[m, 0] + q[m, 1]:
                mask |= 1 << (1 - int(state_bit[i]))
        out_mask[i] = mask


class Receiver:
    """Bob's receiver: basis choice, two threshold detectors with dark counts, dead time, after-pulses."""

    def __init__(
        self,
        receiver: ReceiverParams,
        misalignment: float,
        rep_rate_hz: float,
        seed: int | np.random.Generator | None = None,
    ) -> None:
        self.receiver = receiver
        self.dead_gates = dead_gates(receiver.dead_time_s, rep_rate_hz)
        self.rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
        # Same per-photon probabilities as the combined tables (state bit plays Alice's bit, rel = 0).
        self._q = np.array(
            [per_photon_probs(receiver, misalignment, 0, 0, 0), per_photon_probs(receiver, misalignment, 0, 1, 0)]
        )

    def _bases(self, size: int) -> np.ndarray:
        return (self.rng.random(size) >= self.receiver.p_z).astype(np.uint8)

    def detect(self, light: Light) -> DetectionRecord:
        """Measure the arriving light of one frame; return Bob's detection record."""
        n_pulses = light.n_pulses
        rec = self.receiver
        beta = self._bases(len(light))
        photon_mask = np.empty(len(light), np.uint8)
        _photon_clicks_kernel(light.photons, light.basis, light.bit, beta, self._q, new_key(self.rng), photon_mask)
        # Dark counts: an independent sparse Bernoulli(p_dc) process per detector over all gates.
        p_dc = rec.dark_count_per_detector
        dark = [sample_events(n_pulses, np.array([p_dc]), self.rng)[0].astype(np.uint64) for _ in (0, 1)]
        index = _sorted_union(light.pulse_index, *dark)
        mask = np.zeros(index.size, np.uint8)
        pos_light = np.searchsorted(index, light.pulse_index)
        mask[pos_light] |= photon_mask
        for d, dark_d in enumerate(dark):
            mask[np.searchsorted(index, dark_d)] |= np.uint8(1 << d)
        basis = self._bases(index.size)
        basis[pos_light] = beta
        keep = mask != 0
        out_index, bob_bit, src, _ = resolve_clicks(
            index[keep].view(np.int64),
            mask[keep],
            np.zeros(int(keep.sum()), np.uint8),
            n_pulses,
            self.dead_gates,
            rec.afterpulse,
            None,
            new_key(self.rng),
        )
        out_basis = basis[keep][np.maximum(src, 0)]
        pure_ap = np.nonzero(src < 0)[0]
        if pure_ap.size:  # an after-pulse gate: Bob's basis there was chosen already if light arrived
            gate = out_index[pure_ap].astype(np.uint64)
            pos = np.minimum(np.searchsorted(index, gate), index.size - 1)
            known = index[pos] == gate
            out_basis[pure_ap] = np.where(known, basis[pos], self._bases(pure_ap.size))
        return DetectionRecord(n_pulses, out_index.astype(np.uint64), out_basis.astype(np.uint8), bob_bit)


class SplitDevice:
    """A :class:`Transmitter` and a :class:`Receiver` joined by :class:`Light` only, as a :class:`QKDDevice`."""

    def __init__(
        self, params: DeviceParams, eve: Eavesdropper | None = None, seed: int | np.random.Generator | None = None
    ) -> None:
        self.params = params
        root = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
        alice_rng, bob_rng = root.spawn(2)
        self.transmitter = Transmitter(params, eve, alice_rng)
        self.receiver = Receiver(params.receiver, params.channel.misalignment, params.source.rep_rate_hz, bob_rng)

    def run_frame(self, n_pulses: int) -> Frame:
        """Emit, measure, then let Alice look up Bob's announced indices (as sifting would)."""
        light = self.transmitter.emit(n_pulses)
        bob = self.receiver.detect(light)
        alice = self.transmitter.alice_record(bob.pulse_index)
        truth = self.transmitter.ground_truth_oracle(bob.pulse_index)
        return Frame(alice=alice, bob=bob, ground_truth=truth)
