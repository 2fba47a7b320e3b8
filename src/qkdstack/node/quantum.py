"""The quantum channel between two node processes: it carries only what a fibre carries.

The transmitter's node sends, per frame, the :class:`~qkdstack.physics.split.Light` that
reaches the receiver's detectors (pulse index, photon number, polarisation basis and bit of
the photons; the receiver's basis-independent loss η_Bob is applied before it crosses, see
:mod:`qkdstack.physics.split`) and nothing of Alice's classical record. Indices travel as varint gaps, the
basis and bit as packed bits. This connection stands in for the fibre in simulations; it
is not part of the classical channel and is not authenticated (a fibre is not either:
tampering with it shows up as errors, which the protocol measures).

:class:`TransmitterRecord` adapts Alice's transmitter to what sifting needs (``n_pulses``
and ``lookup``): settings of pulses from which no light arrived are materialised on
demand as a keyed function of the pulse index (see :class:`~qkdstack.physics.split.TransmittedFrame`),
so a look-up costs O(detections), never O(pulses).

With ``[device] source = "records"`` (:func:`recorded_frame`) no light crosses: the connection only
carries each frame's number, so that both sites read their own record of the same frame.
"""

from __future__ import annotations

import asyncio

import numpy as np

from qkdstack.bits import BitArray
from qkdstack.errors import ChannelError
from qkdstack.physics.recorded import RecordSource
from qkdstack.physics.records import AliceRecord, DetectionRecord
from qkdstack.physics.split import Light, TransmittedFrame, Transmitter
from qkdstack.transport.channel import Channel
from qkdstack.transport.varint import decode_increasing, encode_increasing

KIND = "quantum.light"


def encode_light(light: Light, frame_id: int) -> dict:
    """The message fields of one frame's light (indices as varint gaps, basis and bit packed)."""
    return {
        "frame_id": frame_id,
        "n_pulses": light.n_pulses,
        "count": len(light),
        "indices": encode_increasing(light.pulse_index),
        "photons": light.photons.astype(np.uint8) if len(light) and light.photons.max() < 256 else light.photons,
        "basis": BitArray.from_bits(light.basis),
        "bit": BitArray.from_bits(light.bit),
    }


async def send_light(channel: Channel, light: Light, frame_id: int) -> None:
    """Send one frame's arriving light."""
    await channel.send(KIND, **encode_light(light, frame_id))


async def recv_light(channel: Channel) -> tuple[int, Light]:
    """Receive one frame's light: (frame ID, light)."""
    return decode_light(await channel.recv(expect=KIND))


def decode_light(msg: dict) -> tuple[int, Light]:
    """(frame ID, light) from the message fields, with every check."""
    count = int(msg["count"])
    photons = np.asarray(msg["photons"]).astype(np.uint16)
    basis, bit = msg["basis"].to_bits(), msg["bit"].to_bits()
    if not (photons.size == basis.size == bit.size == count):
        raise ChannelError("malformed light frame on the quantum channel")
    index = decode_increasing(msg["indices"], count)
    n_pulses = int(msg["n_pulses"])
    if count and int(index[-1]) >= n_pulses:
        raise ChannelError("light frame has a pulse index beyond the frame")
    return int(msg["frame_id"]), Light(n_pulses, index, photons, basis, bit)


async def recorded_frame(
    channel: Channel, source: RecordSource, stop: asyncio.Event | None = None
) -> tuple[int, AliceRecord | DetectionRecord]:
    """One frame of a device made of files (docs/devices.md): (frame number, this site's record of it).

    The transmitter takes the lowest-numbered frame waiting in ``alice/`` (waiting for one if
    none is there yet) and sends, in place of light, an empty light message carrying that
    frame number and its size; the receiver then takes the same frame number from ``bob/``,
    whose size must agree. Both consume the frame. A malformed record raises
    :class:`~qkdstack.physics.recorded.RecordError` before any post-processing. If ``stop`` is set
    while the transmitter waits for a frame, :class:`ChannelError` ends the session.
    """
    if source.role == "alice":
        frame_no = await source.wait_frame_number(stop=stop)
        if frame_no is None:
            raise ChannelError("stopped while waiting for the next records frame")
        record = source.take(frame_no)
        empty = np.empty(0, np.uint64)
        marker = Light(record.n_pulses, empty, np.empty(0, np.uint16), np.empty(0, np.uint8), np.empty(0, np.uint8))
        await send_light(channel, marker, frame_no)
        return frame_no, record
    frame_no, light = await recv_light(channel)
    if len(light):
        raise ChannelError("the transmitter sent light, but this site's [device] source is \"records\"")
    return frame_no, source.take(frame_no, light.n_pulses)


class TransmitterRecord:
    """Alice's record of the current frame, looked up by pulse index (see module docstring)."""

    def __init__(self, transmitter: Transmitter, n_pulses: int) -> None:
        # The frame just emitted, held by this record: the transmitter may emit the next frame while
        # this one is still being sifted.
        self._frame: TransmittedFrame = transmitter.last_frame
        if self._frame.n_pulses != n_pulses:
            raise ValueError("TransmitterRecord must be made right after the transmitter emitted its frame")
        self.n_pulses = n_pulses

    def lookup(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Alice's (intensity, basis, bit) at Bob's announced indices: one merge pass when they are sorted."""
        return self._frame.lookup(indices)

    def __repr__(self) -> str:
        return f"TransmitterRecord(n_pulses={self.n_pulses})"
