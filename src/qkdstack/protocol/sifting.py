"""Sifting: agree which detections were measured in the basis Alice prepared.

1. Bob announces the pulse indices at which he registered a click (varint gaps, about
   2–3 bytes per detection) and his measurement bases (packed bits).
2. Alice looks up her settings at those indices and answers with her bases (packed).
   Both now know which detections match.
3. Alice then announces the intensity class of every matched detection (two packed
   bit-planes), which parameter estimation needs and which must come only *after*
   Bob's detections are fixed (decoy-state security rests on Bob not knowing the
   intensity when he reports).

Nothing here depends on key bits, so nothing is disclosed. The output at each party is
its own :class:`SiftedKey`: key-basis (Z) bits and test-basis (X) bits with their
intensity classes, in pulse order.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from qkdstack.bits import BitArray
from qkdstack.errors import ProtocolAbort
from qkdstack.physics.params import X, Z
from qkdstack.physics.records import AliceRecord, DetectionRecord
from qkdstack.protocol.channel import Channel
from qkdstack.transport.varint import decode_increasing, encode_increasing

STAGE = "sifting"


@dataclass(frozen=True, repr=False)
class SiftedKey:
    """One party's sifted bits: key basis (Z) and test basis (X), each with intensity classes."""

    key_bits: np.ndarray  # uint8 0/1, Z-basis matched detections
    key_intensity: np.ndarray  # uint8 class per key bit
    test_bits: np.ndarray  # uint8 0/1, X-basis matched detections
    test_intensity: np.ndarray  # uint8 class per test bit
    detections: int  # Bob's clicks announced

    def __repr__(self) -> str:
        return f"SiftedKey(key={self.key_bits.size} bits, test={self.test_bits.size} bits)"


def _pack_classes(classes: np.ndarray) -> tuple[BitArray, BitArray]:
    """Two bit-planes (low, high) of intensity classes 0..3."""
    return BitArray.from_bits(classes & 1), BitArray.from_bits(classes >> 1)


def _unpack_classes(low: BitArray, high: BitArray) -> np.ndarray:
    return (low.to_bits() | (high.to_bits() << 1)).astype(np.uint8)


def _split(bits: np.ndarray, basis: np.ndarray, match: np.ndarray, classes: np.ndarray) -> tuple[np.ndarray, ...]:
    """Key-basis bits and classes, then test-basis bits and classes, of the matched detections."""
    matched_basis, matched_bits, matched_classes = basis[match], bits[match], classes[match]
    z, x = matched_basis == Z, matched_basis == X
    return matched_bits[z], matched_classes[z], matched_bits[x], matched_classes[x]


async def alice(channel: Channel, record: AliceRecord) -> SiftedKey:
    """Alice's side: answer Bob's announcement with her bases, then the intensity classes."""
    msg = await channel.recv(expect="sifting.detections")
    count = int(msg["count"])
    if count < 0 or count > record.n_pulses:
        raise ProtocolAbort(STAGE, f"Bob announced {count} detections in a frame of {record.n_pulses} pulses")
    indices = decode_increasing(msg["indices"], count)
    if count and int(indices[-1]) >= record.n_pulses:
        raise ProtocolAbort(STAGE, "Bob announced a pulse index beyond the end of the frame")
    bob_basis = msg["bases"].to_bits() if isinstance(msg["bases"], BitArray) else None
    if bob_basis is None or bob_basis.size != count:
        raise ProtocolAbort(STAGE, "Bob's basis announcement does not match his detection count")
    intensity, basis, bit = record.lookup(indices)
    await channel.send("sifting.bases", bases=BitArray.from_bits(basis))
    match = basis == bob_basis
    low, high = _pack_classes(intensity[match])
    await channel.send("sifting.intensities", low=low, high=high)
    key_bits, key_cls, test_bits, test_cls = _split(bit, basis, match, intensity)
    return SiftedKey(key_bits, key_cls, test_bits, test_cls, count)


async def bob(channel: Channel, record: DetectionRecord) -> SiftedKey:
    """Bob's side: announce detections and bases, learn the matches and intensity classes."""
    count = len(record)
    await channel.send(
        "sifting.detections",
        count=count,
        indices=encode_increasing(record.pulse_index),
        bases=BitArray.from_bits(record.basis),
    )
    msg = await channel.recv(expect="sifting.bases")
    alice_basis = msg["bases"].to_bits()
    if alice_basis.size != count:
        raise ProtocolAbort(STAGE, "Alice's basis answer does not match the detection count")
    match = alice_basis == record.basis
    msg = await channel.recv(expect="sifting.intensities")
    classes = _unpack_classes(msg["low"], msg["high"])
    if classes.size != int(match.sum()):
        raise ProtocolAbort(STAGE, "Alice's intensity classes do not match the sifted count")
    full = np.zeros(count, dtype=np.uint8)
    full[match] = classes
    key_bits, key_cls, test_bits, test_cls = _split(record.bit, record.basis, match, full)
    return SiftedKey(key_bits, key_cls, test_bits, test_cls, count)
