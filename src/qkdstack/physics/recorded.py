"""A device made of files: both parties' raw records of each frame, as a real device (or another simulator) writes them.

The format (version 1, described field by field in docs/devices.md) is one NumPy ``.npz``
archive per party and frame, in a records folder::

    DIR/alice/frame-000001.npz   Alice's record of frame 1
    DIR/bob/frame-000001.npz     Bob's detection record of frame 1
    DIR/device.json              optional: the device parameters that wrote them (for people)

Each archive holds ``format_version`` (1), ``role`` (``"alice"`` or ``"bob"``), ``n_pulses``,
``pulse_index`` (uint64, strictly increasing, below ``n_pulses``) and, for Alice,
``intensity``, ``basis``, ``bit`` (uint8, one per recorded pulse), for Bob ``basis`` and
``bit``. Alice's record may be sparse (every pulse Bob detected must be in it). Archives
are written whole and renamed into place (:func:`save_frame`), so a reader never sees half
a file; fields beyond these are ignored (room for metadata).

:class:`RecordSource` is one party's side (what a node reads: the transmitter reads
``alice/``, the receiver ``bob/``, each from the same frame number); it consumes a frame
(deletes its file) once read, so no frame's raw key is ever used twice, not even across a
restart. :class:`RecordedDevice` joins both sides behind :class:`QKDDevice`.

Anything malformed — a missing or truncated file, a missing field, a wrong dtype or shape,
indices not increasing or beyond the frame, values out of range, Bob's indices missing from
Alice's record — raises :class:`RecordError`, one sentence naming the file and the field;
it is a :class:`~qkdstack.errors.ProtocolAbort` (stage ``device``): the round aborts before
any post-processing, and a bad file is set aside (renamed ``*.bad``) so that the next round
reads the next frame.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

from qkdstack.errors import ProtocolAbort
from qkdstack.physics.params import DeviceParams
from qkdstack.physics.records import AliceRecord, DetectionRecord, Frame

FORMAT_VERSION = 1
ROLES = ("alice", "bob")
_NAME = re.compile(r"^frame-(\d{6,})\.npz$")
log = logging.getLogger("qkdstack.device")


class RecordError(ProtocolAbort):
    """A records file is missing, truncated or malformed; the message names the file and the field."""

    def __init__(self, path: Path | str, problem: str) -> None:
        super().__init__("device", f"records file {path}: {problem}")
        self.path = Path(path)


def frame_path(records_dir: Path | str, role: str, frame: int) -> Path:
    """Where party ``role`` ("alice" or "bob") keeps frame number ``frame`` (≥ 1)."""
    return Path(records_dir) / role / f"frame-{frame:06d}.npz"


def frame_numbers(records_dir: Path | str, role: str) -> list[int]:
    """Frame numbers present for ``role``, ascending."""
    folder = Path(records_dir) / role
    if not folder.is_dir():
        return []
    return sorted(int(m.group(1)) for p in folder.iterdir() if (m := _NAME.match(p.name)))


def save_frame(records_dir: Path | str, frame_no: int, frame: Frame) -> tuple[Path, Path]:
    """Write both parties' records of ``frame`` as frame number ``frame_no``; returns (Alice's, Bob's) paths.

    Each file is written under a temporary name, flushed and renamed, so a reader sees it whole or not at all.
    """
    a, b = frame.alice, frame.bob
    alice = {
        "format_version": np.uint16(FORMAT_VERSION),
        "role": np.str_("alice"),
        "n_pulses": np.uint64(a.n_pulses),
        "pulse_index": np.ascontiguousarray(a.pulse_index, np.uint64),
        "intensity": np.ascontiguousarray(a.intensity, np.uint8),
        "basis": np.ascontiguousarray(a.basis, np.uint8),
        "bit": np.ascontiguousarray(a.bit, np.uint8),
    }
    bob = {
        "format_version": np.uint16(FORMAT_VERSION),
        "role": np.str_("bob"),
        "n_pulses": np.uint64(b.n_pulses),
        "pulse_index": np.ascontiguousarray(b.pulse_index, np.uint64),
        "basis": np.ascontiguousarray(b.basis, np.uint8),
        "bit": np.ascontiguousarray(b.bit, np.uint8),
    }
    alice_path = _write(frame_path(records_dir, "alice", frame_no), alice)
    return alice_path, _write(frame_path(records_dir, "bob", frame_no), bob)


def _write(path: Path, arrays: dict[str, np.ndarray]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as fh:
        np.savez(fh, **arrays)
        fh.flush()
        os.fsync(fh.fileno())
    os.chmod(tmp, 0o600)  # raw key material
    os.replace(tmp, path)
    return path


def write_device_json(records_dir: Path | str, params: DeviceParams) -> Path:
    """``device.json``: the parameters of the device that wrote the records (informational; nodes ignore it)."""
    src, ch, rec = params.source, params.channel, params.receiver
    doc = {
        "format_version": FORMAT_VERSION,
        "rep_rate_hz": src.rep_rate_hz,
        "intensities": list(src.intensities),
        "intensity_probs": list(src.intensity_probs),
        "basis_prob_z": src.p_z,
        "distance_km": ch.length_km,
        "detector_efficiency": rec.efficiency,
        "dark_count": rec.dark_count,
    }
    path = Path(records_dir) / "device.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=2) + "\n")
    return path


def _field(path: Path, data: np.lib.npyio.NpzFile, name: str) -> np.ndarray:
    if name not in data.files:
        raise RecordError(path, f"field {name!r} is missing")
    try:
        return data[name]
    except (ValueError, OSError, EOFError, zipfile.BadZipFile, KeyError) as exc:
        raise RecordError(path, f"field {name!r} cannot be read (truncated or corrupt: {exc})") from None


def _scalar_int(path: Path, data: np.lib.npyio.NpzFile, name: str) -> int:
    value = _field(path, data, name)
    if value.shape != () or value.dtype.kind not in "ui":
        raise RecordError(path, f"field {name!r} must be an integer scalar, got dtype {value.dtype} "
                          f"shape {value.shape}")
    return int(value)


def _column(path: Path, data: np.lib.npyio.NpzFile, name: str, dtype: type, size: int, upper: int) -> np.ndarray:
    value = _field(path, data, name)
    if value.dtype != np.dtype(dtype) or value.ndim != 1 or value.size != size:
        raise RecordError(path, f"field {name!r} must be {np.dtype(dtype)} with one entry per pulse_index ({size}), "
                          f"got dtype {value.dtype} shape {value.shape}")
    if size and int(value.max()) >= upper:
        raise RecordError(path, f"field {name!r} must hold values below {upper}, found {int(value.max())}")
    return value


def read_record(path: Path | str, role: str, n_intensities: int | None = None) -> AliceRecord | DetectionRecord:
    """Read and check one party's record of a frame (see the module docstring); raises :class:`RecordError`."""
    path = Path(path)
    try:
        data = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise RecordError(path, "is missing") from None
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as exc:
        raise RecordError(path, f"is not a readable .npz archive (truncated or corrupt: {exc})") from None
    if not isinstance(data, np.lib.npyio.NpzFile):
        raise RecordError(path, "is a single .npy array, not an .npz archive of named fields")
    with data:
        version = _scalar_int(path, data, "format_version")
        if version != FORMAT_VERSION:
            raise RecordError(path, f"field 'format_version' is {version}; this qkdstack reads version "
                              f"{FORMAT_VERSION}")
        got_role = _field(path, data, "role")
        if got_role.shape != () or got_role.dtype.kind != "U" or str(got_role) != role:
            raise RecordError(path, f"field 'role' must be the string {role!r}, got {got_role!r}")
        n_pulses = _scalar_int(path, data, "n_pulses")
        if not 0 < n_pulses < 2**62:
            raise RecordError(path, f"field 'n_pulses' must be a positive integer below 2^62, got {n_pulses}")
        index = _field(path, data, "pulse_index")
        if index.dtype != np.uint64 or index.ndim != 1:
            raise RecordError(path, f"field 'pulse_index' must be a one-dimensional uint64 array, got dtype "
                              f"{index.dtype} shape {index.shape}")
        if index.size > 1 and not bool(np.all(index[1:] > index[:-1])):
            raise RecordError(path, "field 'pulse_index' must be strictly increasing")
        if index.size and int(index[-1]) >= n_pulses:
            raise RecordError(path, f"field 'pulse_index' holds {int(index[-1])}, beyond the frame's n_pulses "
                              f"{n_pulses}")
        size = index.size
        if role == "alice":
            classes = n_intensities if n_intensities is not None else 256
            intensity = _column(path, data, "intensity", np.uint8, size, classes)
            basis = _column(path, data, "basis", np.uint8, size, 2)
            bit = _column(path, data, "bit", np.uint8, size, 2)
            return AliceRecord(n_pulses, index, intensity, basis, bit)
        basis = _column(path, data, "basis", np.uint8, size, 2)
        bit = _column(path, data, "bit", np.uint8, size, 2)
        return DetectionRecord(n_pulses, index, basis, bit)


class RecordSource:
    """One party's frames from a records folder, consumed in order (``alice/`` or ``bob/``).

    ``n_intensities`` bounds Alice's intensity classes (those of the node's ``[device]``).
    """

    def __init__(self, records_dir: Path | str, role: str, n_intensities: int | None = None) -> None:
        if role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}, got {role!r}")
        self.records_dir = Path(records_dir)
        self.role = role
        self.n_intensities = n_intensities

    def next_frame_number(self) -> int | None:
        """The lowest frame number waiting for this party, or None."""
        numbers = frame_numbers(self.records_dir, self.role)
        return numbers[0] if numbers else None

    async def wait_frame_number(self, poll_s: float = 0.2, stop: asyncio.Event | None = None) -> int | None:
        """The lowest frame number waiting, after waiting for one to appear (a device writes them as it runs).

        Returns None if ``stop`` is set while waiting. Logs once per wait that it is waiting.
        """
        logged = False
        while (number := self.next_frame_number()) is None:
            if stop is not None and stop.is_set():
                return None
            if not logged:
                log.info("waiting for the next frame in %s", self.records_dir / self.role)
                logged = True
            await asyncio.sleep(poll_s)
        return number

    def take(self, frame_no: int, n_pulses: int | None = None) -> AliceRecord | DetectionRecord:
        """Read frame ``frame_no`` and consume it (delete the file; a malformed one is renamed ``*.bad``).

        ``n_pulses``, if given, is the frame size the peer announced: the record must agree.
        """
        path = frame_path(self.records_dir, self.role, frame_no)
        try:
            record = read_record(path, self.role, self.n_intensities)
            if n_pulses is not None and record.n_pulses != n_pulses:
                raise RecordError(path, f"field 'n_pulses' is {record.n_pulses} but the peer's record of frame "
                                  f"{frame_no} has {n_pulses}")
        except RecordError:
            if path.exists():
                os.replace(path, path.with_name(path.name + ".bad"))
            raise
        path.unlink()
        return record


class RecordedDevice:
    """Both parties' records from one folder, frame after frame, as a :class:`QKDDevice` (no ground truth).

    ``run_frame(n)`` returns the next frame whose records hold ``n`` pulses (the size is the
    records', so ``n`` only checks it). Bob's detected indices must all be in Alice's record.
    """

    def __init__(self, params: DeviceParams, records_dir: Path | str, *, consume: bool = True) -> None:
        self.params = params
        self.records_dir = Path(records_dir)
        self.consume = consume
        self._alice = RecordSource(records_dir, "alice", params.source.n_intensities)
        self._bob = RecordSource(records_dir, "bob")
        self._read: Callable[[RecordSource, int], AliceRecord | DetectionRecord] = (
            (lambda src, no: src.take(no)) if consume
            else (lambda src, no: read_record(frame_path(src.records_dir, src.role, no), src.role, src.n_intensities))
        )
        self._done: set[int] = set()

    def run_frame(self, n_pulses: int) -> Frame:
        numbers = [n for n in frame_numbers(self.records_dir, "alice") if n not in self._done]
        if not numbers:
            raise RecordError(self.records_dir / "alice", "holds no further frame")
        no = numbers[0]
        self._done.add(no)
        alice = self._read(self._alice, no)
        bob = self._read(self._bob, no)
        assert isinstance(alice, AliceRecord) and isinstance(bob, DetectionRecord)
        path = frame_path(self.records_dir, "bob", no)
        if bob.n_pulses != alice.n_pulses:
            raise RecordError(path, f"field 'n_pulses' is {bob.n_pulses}, Alice's record of the frame has "
                              f"{alice.n_pulses}")
        if alice.n_pulses != n_pulses:
            raise RecordError(frame_path(self.records_dir, "alice", no),
                              f"field 'n_pulses' is {alice.n_pulses}, {n_pulses} were asked for")
        try:
            alice.lookup(bob.pulse_index)
        except Exception:
            raise RecordError(path, "field 'pulse_index' holds detections that Alice's record does not cover") from None
        return Frame(alice=alice, bob=bob, ground_truth=None)
