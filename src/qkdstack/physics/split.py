"""The device split in two halves, for two node processes: Alice's transmitter and Bob's receiver.

What crosses from one half to the other is only light: :class:`Light`, the pulses from which
at least one photon reaches Bob's detectors, each with that photon number and the
polarisation state (basis, bit) the photons carry. Alice's classical record never travels;
Bob's receiver sees no intensity class.

* :class:`Transmitter` is Alice's source, the fibre (with the eavesdropper in it) and the
  *basis-independent loss of Bob's receiver* (its transmittance × detector efficiency,
  η_Bob). In the per-photon model every photon entering the receiver is absorbed by one of
  the two detectors with η_Bob whatever Bob's basis (q_R + q_W = η_Bob in
  :func:`qkdstack.physics.optics.per_photon_probs`), so that loss commutes with the basis
  choice and can be applied where the light leaves the fibre: binomial thinning of the j
  photons at the receiver's entrance with η_Bob. The light that crosses then holds about as
  many pulses as Bob has detections (not η_Bob⁻¹ ≈ 10 times more), which makes the split
  form cost what the combined device costs: O(detections), independent of the frame size.
  Light is sampled with the same event sampler as the combined device, from the thinned
  light table. The transmitter keeps Alice's settings for the pulses whose light it sent
  (columns aligned with the light, no per-pulse storage); the settings of any other pulse
  are a *function of its index*: a SplitMix64 word keyed per frame and indexed by the pulse
  gives a draw from P(settings | no light), so looking a pulse up twice gives the same
  answer and nothing is stored. That is exact because Bob's dark counts and after-pulses
  on such pulses do not depend on Alice's settings.
* :class:`Receiver` is Bob: active basis choice (a keyed hash of the gate index, so that
  the basis at a gate is the same whether light, a dark count or an after-pulse clicks
  there), routing of each absorbed photon to a detector (the state's bit with 1 − e_mis if
  the bases match, else ½), dark counts per detector as two sparse Bernoulli processes over
  all N gates drawn by geometric gaps and merged with the light in the same pass, then
  dead time, after-pulses (next-gate placement: a receiver cannot know Alice's intensity
  class) and squashing by :func:`qkdstack.physics.detectors.resolve_clicks`.

Every kernel is Numba with ``nogil=True``: a node can run the device in one thread while
another thread post-processes. Nothing is sorted: the light comes out of the sampler in
pulse order, dark counts are merged into it, and Bob's announced indices arrive sorted.

:class:`SplitDevice` chains the halves in one process behind the :class:`QKDDevice`
interface; its frames have the statistics of
``SimulatedDevice(..., afterpulse_mode="next-gate")``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from numba import njit
from scipy import stats

from qkdstack.errors import ChannelError
from qkdstack.physics.detectors import dead_gates, resolve_clicks
from qkdstack.physics.device import check_pulses
from qkdstack.physics.eve import Eavesdropper, NoEve
from qkdstack.physics.optics import LightTable, light_table
from qkdstack.physics.params import DeviceParams, ReceiverParams
from qkdstack.physics.records import AliceRecord, DetectionRecord, Frame, SimulatorGroundTruth
from qkdstack.physics.sampling import (
    GOLDEN_GAMMA,
    alias_draw,
    alias_table,
    gap_draw,
    gap_table,
    new_key,
    splitmix64,
    uniform_open0,
)

_NO_EVENT = np.int64(2**62)


@dataclass(frozen=True, repr=False)
class Light:
    """Pulses from which ≥ 1 photon reaches Bob's detectors: index, photon number, state basis and bit."""

    n_pulses: int
    pulse_index: np.ndarray  # uint64, strictly increasing
    photons: np.ndarray  # uint16, ≥ 1
    basis: np.ndarray  # uint8, basis the photons are polarised in
    bit: np.ndarray  # uint8, bit value they encode in that basis

    def __len__(self) -> int:
        return int(self.pulse_index.size)

    def __repr__(self) -> str:
        return f"Light(n_pulses={self.n_pulses}, arriving={self.pulse_index.size})"


def absorbed_light_table(table: LightTable, eta_bob: float) -> LightTable:
    """The light table with the j photons at Bob's entrance thinned to the j' ~ Binomial(j, η_Bob) absorbed.

    Row (…, j, p) becomes rows (…, j', p·C(j, j') η^j' (1 − η)^(j − j')) for j' = 0 … j; the
    probabilities still sum to 1 and every other column is unchanged.
    """
    j = table.j.astype(np.int64)
    parts = []
    for jp in range(int(j.max(initial=0)) + 1):
        prob = table.prob * np.where(j >= jp, stats.binom.pmf(jp, j, eta_bob), 0.0)
        keep = prob > 0
        parts.append((keep, np.full(int(keep.sum()), jp, np.int32), prob[keep]))
    cols = {}
    for name in ("k", "a", "n", "s", "rel", "ek"):
        col = getattr(table, name)
        cols[name] = np.concatenate([col[keep] for keep, _, _ in parts])
    cols["j"] = np.concatenate([jp for _, jp, _ in parts])
    cols["prob"] = np.concatenate([p for _, _, p in parts])
    # Rows that differ only in the photons at the entrance are now the same outcome: merge them, so the
    # alias tables stay small (L1-resident) and the sampler fast.
    names = ("k", "a", "n", "j", "s", "rel", "ek")
    key = np.stack([cols[name].astype(np.int64) for name in names], axis=1)
    unique, inverse = np.unique(key, axis=0, return_inverse=True)
    prob = np.bincount(inverse.reshape(-1), weights=cols["prob"], minlength=unique.shape[0])
    merged = {name: unique[:, i].astype(cols[name].dtype) for i, name in enumerate(names)}
    return LightTable(**merged, prob=prob)


@njit(cache=True, nogil=True)
def _emit_kernel(
    n_pulses: np.int64,
    gap_threshold: np.ndarray,
    gap_alias: np.ndarray,
    gap_fold: np.int64,
    gap_log1m: float,
    key: np.uint64,
    threshold: np.ndarray,
    alias: np.ndarray,
    row_k: np.ndarray,
    row_a: np.ndarray,
    row_n: np.ndarray,
    row_j: np.ndarray,
    row_s: np.ndarray,
    row_rel: np.ndarray,
    row_ek: np.ndarray,
    out_index: np.ndarray,
    out_photons: np.ndarray,
    out_sbasis: np.ndarray,
    out_sbit: np.ndarray,
    out_k: np.ndarray,
    out_a: np.ndarray,
    out_bit: np.ndarray,
    out_n: np.ndarray,
    out_ek: np.ndarray,
) -> np.int64:
    """Pulses with absorbed light, in pulse order: the light's columns and Alice's at once; −1 if full."""
    cap = out_index.size
    ctr = key
    pos = np.int64(-1)
    count = np.int64(0)
    while True:
        ctr, gap = gap_draw(ctr, gap_threshold, gap_alias, gap_fold, gap_log1m)
        pos += gap
        if pos >= n_pulses:
            break
        if count >= cap:
            return np.int64(-1)
        ctr += GOLDEN_GAMMA
        w = splitmix64(ctr)
        r = alias_draw(w, threshold, alias)
        b = np.uint8(w & np.uint64(1))
        fresh = np.uint8((w >> np.uint64(1)) & np.uint64(1))
        out_index[count] = np.uint64(pos)
        out_photons[count] = row_j[r]
        out_sbasis[count] = row_s[r]
        out_sbit[count] = b if row_rel[r] == 0 else fresh
        out_k[count] = row_k[r]
        out_a[count] = row_a[r]
        out_bit[count] = b
        out_n[count] = row_n[r]
        out_ek[count] = row_ek[r] != 0
        count += 1
    return count


@njit(cache=True, nogil=True)
def _lookup_kernel(
    wanted: np.ndarray,
    n_pulses: np.int64,
    light_index: np.ndarray,
    light_k: np.ndarray,
    light_a: np.ndarray,
    light_bit: np.ndarray,
    light_n: np.ndarray,
    light_ek: np.ndarray,
    dark_key: np.uint64,
    dark_threshold: np.ndarray,
    dark_alias: np.ndarray,
    dark_k: np.ndarray,
    dark_a: np.ndarray,
    dark_n: np.ndarray,
    dark_ek: np.ndarray,
    out_k: np.ndarray,
    out_a: np.ndarray,
    out_bit: np.ndarray,
    out_n: np.ndarray,
    out_ek: np.ndarray,
) -> np.int64:
    """Alice's settings at ``wanted`` (strictly increasing) in one merge pass over the light's indices.

    A wanted pulse that sent light is found by galloping forward from the previous match
    (O(n log(m / n)) for n wanted out of m); any other pulse's settings are drawn from the
    no-light table with the word SplitMix64(dark_key + (index + 1)·γ): a function of the index.
    Returns −1 on success, ``i`` if ``wanted[i]`` lies beyond the frame, −2 if not increasing.
    """
    m = light_index.size
    j = 0
    for i in range(wanted.size):
        x = wanted[i]
        if i > 0 and x <= wanted[i - 1]:
            return np.int64(-2)
        if x >= np.uint64(n_pulses):
            return np.int64(i)
        if j < m and light_index[j] < x:
            lo = j
            step = 1
            while j + step < m and light_index[j + step] < x:
                lo = j + step
                step *= 2
            hi = min(j + step, m)
            while hi - lo > 1:
                mid = (lo + hi) // 2
                if light_index[mid] < x:
                    lo = mid
                else:
                    hi = mid
            j = hi
        if j < m and light_index[j] == x:
            out_k[i] = light_k[j]
            out_a[i] = light_a[j]
            out_bit[i] = light_bit[j]
            out_n[i] = light_n[j]
            out_ek[i] = light_ek[j]
            j += 1
        else:
            w = splitmix64(dark_key + (x + np.uint64(1)) * GOLDEN_GAMMA)
            r = alias_draw(w, dark_threshold, dark_alias)
            out_k[i] = dark_k[r]
            out_a[i] = dark_a[r]
            out_bit[i] = np.uint8(w & np.uint64(1))
            out_n[i] = dark_n[r]
            out_ek[i] = dark_ek[r] != 0
    return np.int64(-1)


class Transmitter:
    """Alice's transmitter and the fibre to Bob (with ``eve`` in it); keeps Alice's record to itself."""

    def __init__(
        self, params: DeviceParams, eve: Eavesdropper | None = None, seed: int | np.random.Generator | None = None
    ) -> None:
        self.params = params
        self.eve = eve if eve is not None else NoEve()
        self.rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
        table = absorbed_light_table(light_table(params, self.eve), params.receiver.efficiency)
        arrives = table.j > 0
        self.p_light = min(float(table.prob[arrives].sum()), 1.0)
        """Probability that a pulse sends Bob's detectors at least one photon."""
        self._light_rows = [
            np.ascontiguousarray(getattr(table, c)[arrives], dt)
            for c, dt in (("k", np.uint8), ("a", np.uint8), ("n", np.uint16), ("j", np.uint16),
                          ("s", np.uint8), ("rel", np.uint8), ("ek", np.uint8))
        ]
        self._light_alias = alias_table(table.prob[arrives]) if self.p_light > 0 else None
        self._gap = gap_table(self.p_light) if self.p_light > 0 else None
        dark = ~arrives
        self._dark_alias = alias_table(table.prob[dark])
        self._dark_rows = [
            np.ascontiguousarray(getattr(table, c)[dark], dt)
            for c, dt in (("k", np.uint8), ("a", np.uint8), ("n", np.uint16), ("ek", np.uint8))
        ]
        self._last = TransmittedFrame(self, 0, np.uint64(0), _empty_alice(0))

    def emit(self, n_pulses: int) -> Light:
        """Send a frame of ``n_pulses`` pulses; return the light that reaches Bob's detectors (cost ∝ light)."""
        n_pulses = check_pulses(n_pulses)
        key = new_key(self.rng)
        dark_key = new_key(self.rng)
        if self._light_alias is None:
            cols = _empty_alice(0)
            self._last = TransmittedFrame(self, n_pulses, dark_key, cols)
            return Light(n_pulses, *(cols[c] for c in ("index", "n", "a", "bit")))
        mean = n_pulses * self.p_light
        cap = int(min(n_pulses, mean + 12 * math.sqrt(mean) + 1024))
        while True:
            out = _empty_alice(cap)
            photons, sbasis, sbit = np.empty(cap, np.uint16), np.empty(cap, np.uint8), np.empty(cap, np.uint8)
            count = _emit_kernel(
                np.int64(n_pulses), *self._gap, key, *self._light_alias, *self._light_rows,
                out["index"], photons, sbasis, sbit, out["k"], out["a"], out["bit"], out["n"], out["ek"],
            )
            if count >= 0:
                break
            cap = min(n_pulses, 2 * cap)  # astronomically rare: same key, so the same events come out
        cols = {name: col[:count] for name, col in out.items()}
        self._last = TransmittedFrame(self, n_pulses, dark_key, cols)
        return Light(n_pulses, cols["index"], photons[:count], sbasis[:count], sbit[:count])

    @property
    def last_frame(self) -> TransmittedFrame:
        """Alice's side of the frame last emitted (kept valid after the next :meth:`emit`)."""
        return self._last

    @property
    def n_pulses(self) -> int:
        """Pulses of the frame last emitted."""
        return self._last.n_pulses

    def settings(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        """See :meth:`TransmittedFrame.settings` (of the frame last emitted)."""
        return self._last.settings(indices)

    def lookup(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """See :meth:`TransmittedFrame.lookup` (of the frame last emitted)."""
        return self._last.lookup(indices)

    def alice_record(self, announced: np.ndarray) -> AliceRecord:
        """Alice's record of exactly the (distinct) pulse indices Bob announced, in the frame last emitted."""
        return self._last.alice_record(announced)

    def ground_truth_oracle(self, detected: np.ndarray) -> SimulatorGroundTruth:
        """Oracle for tests: Eve's knowledge and photon numbers at Bob's detection indices."""
        s = self.settings(detected)
        return SimulatorGroundTruth(eve_knows=s["ek"], photon_number=s["n"])


class TransmittedFrame:
    """Alice's record of one emitted frame: her settings where light left, a keyed draw everywhere else.

    Holds only the columns aligned with the frame's light (O(detections)); looking up n
    indices costs O(n) (one merge pass for Bob's sorted announcement).
    """

    def __init__(self, tx: Transmitter, n_pulses: int, dark_key: np.uint64, cols: dict[str, np.ndarray]) -> None:
        self.n_pulses = n_pulses
        self._dark_key = dark_key
        self._dark_alias = tx._dark_alias
        self._dark_rows = tx._dark_rows
        self._cols = cols

    def settings(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        """Alice's columns k, a, bit, n, ek at pulse ``indices`` of this frame (cost ∝ len(indices)).

        Sorted, distinct indices (Bob's announcement) take one merge pass; any other order is
        looked up through a sort. Raises :class:`ChannelError` for an index beyond the frame.
        """
        wanted = np.ascontiguousarray(indices, dtype=np.uint64).reshape(-1)
        if wanted.size == 0:
            return {name: col for name, col in _empty_alice(0).items() if name != "index"}
        out = _empty_alice(wanted.size)
        status = self._lookup(wanted, out)
        if status == -1:
            return {name: out[name] for name in ("k", "a", "bit", "n", "ek")}
        if status >= 0:
            raise ChannelError("peer announced pulse indices beyond the frame Alice sent")
        distinct, inverse = np.unique(wanted, return_inverse=True)
        out = _empty_alice(distinct.size)
        if self._lookup(distinct, out) != -1:
            raise ChannelError("peer announced pulse indices beyond the frame Alice sent")
        return {name: out[name][inverse] for name in ("k", "a", "bit", "n", "ek")}

    def _lookup(self, wanted: np.ndarray, out: dict[str, np.ndarray]) -> int:
        c = self._cols
        return int(_lookup_kernel(
            wanted, np.int64(self.n_pulses), c["index"], c["k"], c["a"], c["bit"], c["n"], c["ek"],
            self._dark_key, *self._dark_alias, *self._dark_rows,
            out["k"], out["a"], out["bit"], out["n"], out["ek"],
        ))

    def lookup(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(intensity, basis, bit) at the given pulse indices, as :meth:`AliceRecord.lookup` answers."""
        s = self.settings(indices)
        return s["k"], s["a"], s["bit"]

    def alice_record(self, announced: np.ndarray) -> AliceRecord:
        """Alice's record of exactly the (distinct) pulse indices announced."""
        index = np.unique(np.asarray(announced, dtype=np.uint64))
        s = self.settings(index)
        return AliceRecord(self.n_pulses, index, s["k"], s["a"], s["bit"])

    def __repr__(self) -> str:
        return f"TransmittedFrame(n_pulses={self.n_pulses}, light={self._cols['index'].size})"


def _empty_alice(size: int) -> dict[str, np.ndarray]:
    return {
        "index": np.empty(size, np.uint64),
        "k": np.empty(size, np.uint8),
        "a": np.empty(size, np.uint8),
        "bit": np.empty(size, np.uint8),
        "n": np.empty(size, np.uint16),
        "ek": np.empty(size, np.bool_),
    }


@njit(inline="always", cache=True)
def _gate_basis(key: np.uint64, gate: np.int64, p_z: float) -> np.uint8:
    """Bob's basis at a gate (1 = X with probability 1 − p_Z): a keyed SplitMix64 word of the gate index."""
    w = splitmix64(key + np.uint64(gate + 1) * GOLDEN_GAMMA)
    return np.uint8(uniform_open0(w) > p_z)


@njit(cache=True, nogil=True)
def _gate_bases(index: np.ndarray, key: np.uint64, p_z: float) -> np.ndarray:
    out = np.empty(index.size, np.uint8)
    for i in range(index.size):
        out[i] = _gate_basis(key, np.int64(index[i]), p_z)
    return out


@njit(cache=True, nogil=True)
def _primary_clicks_kernel(
    n_pulses: np.int64,
    light_index: np.ndarray,
    photons: np.ndarray,
    state_basis: np.ndarray,
    state_bit: np.ndarray,
    route: np.ndarray,
    basis_key: np.uint64,
    p_z: float,
    photon_key: np.uint64,
    dark_on: bool,
    gap_threshold: np.ndarray,
    gap_alias: np.ndarray,
    gap_fold: np.int64,
    gap_log1m: float,
    dark_key0: np.uint64,
    dark_key1: np.uint64,
    out_index: np.ndarray,
    out_mask: np.ndarray,
) -> np.int64:
    """Bob's primary clicks in pulse order: the light merged with both detectors' dark counts; −1 if full.

    Each absorbed photon goes to the detector of the state's bit with ``route[m]`` (m = 0
    if Bob's basis at the gate equals the state's basis, else 1) and to the other one
    otherwise. Dark counts of detector d are a Bernoulli(p_dc) process over the gates, drawn
    by geometric gaps from the stream keyed ``dark_key{d}``.
    """
    cap = out_index.size
    ctr = photon_key
    c0 = dark_key0
    c1 = dark_key1
    d0 = _NO_EVENT
    d1 = _NO_EVENT
    if dark_on:
        c0, g0 = gap_draw(c0, gap_threshold, gap_alias, gap_fold, gap_log1m)
        d0 = g0 - 1
        c1, g1 = gap_draw(c1, gap_threshold, gap_alias, gap_fold, gap_log1m)
        d1 = g1 - 1
    m = light_index.size
    i = 0
    count = np.int64(0)
    while True:
        g = min(d0, d1)
        if i < m and np.int64(light_index[i]) < g:
            g = np.int64(light_index[i])
        if g >= n_pulses:
            break
        mask = 0
        if i < m and np.int64(light_index[i]) == g:
            mis = 0 if _gate_basis(basis_key, g, p_z) == state_basis[i] else 1
            b = int(state_bit[i])
            for _ in range(photons[i]):
                ctr += GOLDEN_GAMMA
                if uniform_open0(splitmix64(ctr)) <= route[mis]:
                    mask |= 1 << b
                else:
                    mask |= 1 << (1 - b)
            i += 1
        if d0 == g:
            mask |= 1
            c0, gap = gap_draw(c0, gap_threshold, gap_alias, gap_fold, gap_log1m)
            d0 = g + gap
        if d1 == g:
            mask |= 2
            c1, gap = gap_draw(c1, gap_threshold, gap_alias, gap_fold, gap_log1m)
            d1 = g + gap
        if count >= cap:
            return np.int64(-1)
        out_index[count] = g
        out_mask[count] = mask
        count += 1
    return count


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
        # Given absorption, a photon reaches the detector of the state's bit with 1 − e_mis when the
        # bases match and ½ otherwise (per_photon_probs divided by η_Bob).
        self._route = np.array([1.0 - misalignment, 0.5])
        p_dc = receiver.dark_count_per_detector
        self._dark_gap = gap_table(p_dc) if p_dc > 0 else gap_table(0.5)

    def detect(self, light: Light) -> DetectionRecord:
        """Measure the light of one frame; return Bob's detection record (cost ∝ light + dark counts)."""
        n_pulses = light.n_pulses
        rec = self.receiver
        p_dc = rec.dark_count_per_detector
        basis_key = new_key(self.rng)
        photon_key, key0, key1, ap_key = (new_key(self.rng) for _ in range(4))
        mean = len(light) + 2 * n_pulses * p_dc
        cap = int(min(n_pulses, mean + 12 * math.sqrt(mean) + 1024))
        index = np.ascontiguousarray(light.pulse_index, dtype=np.uint64)
        photons = np.ascontiguousarray(light.photons, dtype=np.uint16)
        sbasis = np.ascontiguousarray(light.basis, dtype=np.uint8)
        sbit = np.ascontiguousarray(light.bit, dtype=np.uint8)
        while True:
            out_index = np.empty(cap, np.int64)
            out_mask = np.empty(cap, np.uint8)
            count = _primary_clicks_kernel(
                np.int64(n_pulses), index, photons, sbasis, sbit, self._route, basis_key, float(rec.p_z),
                photon_key, p_dc > 0, *self._dark_gap, key0, key1, out_index, out_mask,
            )
            if count >= 0:
                break
            cap = min(n_pulses, 2 * cap)  # same keys: the same clicks come out
        clicks, masks = out_index[:count], out_mask[:count]  # every entry clicks at least one detector
        if self.dead_gates == 0 and rec.afterpulse == 0:
            bob_index = clicks
            bob_bit = _squash(masks, new_key(self.rng))
        else:
            bob_index, bob_bit, _, _ = resolve_clicks(
                clicks, masks, np.zeros(clicks.size, np.uint8), n_pulses, self.dead_gates, rec.afterpulse, None, ap_key
            )
        basis = _gate_bases(bob_index, basis_key, float(rec.p_z))
        return DetectionRecord(n_pulses, bob_index.view(np.uint64), basis, bob_bit)


@njit(cache=True, nogil=True)
def _squash(mask: np.ndarray, key: np.uint64) -> np.ndarray:
    """Bob's bit per click: the detector's, or a random bit for a double click."""
    out = np.empty(mask.size, np.uint8)
    ctr = key
    for i in range(mask.size):
        if mask[i] == 3:
            ctr += GOLDEN_GAMMA
            out[i] = np.uint8(splitmix64(ctr) & np.uint64(1))
        else:
            out[i] = mask[i] >> 1
    return out


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
        """Emit, measure, then let Alice look up Bob's detected indices (as sifting would)."""
        light = self.transmitter.emit(n_pulses)
        bob = self.receiver.detect(light)
        s = self.transmitter.settings(bob.pulse_index)
        alice = AliceRecord(n_pulses, bob.pulse_index, s["k"], s["a"], s["bit"])
        truth = SimulatorGroundTruth(eve_knows=s["ek"], photon_number=s["n"])
        return Frame(alice=alice, bob=bob, ground_truth=truth)
