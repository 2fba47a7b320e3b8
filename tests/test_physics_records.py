"""A device made of files (physics/recorded.py): the records format, its checks, frame sizes in time, and two
nodes distilling keys from records written by ``qkdstack simulate --save``."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import pytest

from _node_support import PULSES, deploy, edit_config, run_nodes, status, store_blocks, store_keys
from qkdstack.cli import main as cli_main
from qkdstack.errors import ConfigError, ProtocolAbort, QKDError
from qkdstack.node.config import DeviceSection
from qkdstack.physics.device import QKDDevice, SimulatedDevice
from qkdstack.physics.params import ChannelParams, DeviceParams
from qkdstack.physics.recorded import (
    RecordedDevice,
    RecordError,
    RecordSource,
    frame_numbers,
    frame_path,
    save_frame,
)

PARAMS = DeviceParams(channel=ChannelParams(length_km=5.0))


def _saved(tmp_path: Path, frames: int = 2, n: int = 2_000_000) -> tuple[Path, list]:
    device = SimulatedDevice(PARAMS, seed=4)
    out = []
    for no in range(1, frames + 1):
        frame = device.run_frame(n)
        save_frame(tmp_path / "rec", no, frame)
        out.append(frame)
    return tmp_path / "rec", out


def test_records_round_trip_and_are_consumed_once(tmp_path):
    rec, frames = _saved(tmp_path)
    device = RecordedDevice(PARAMS, rec)
    assert isinstance(device, QKDDevice)
    for frame in frames:
        got = device.run_frame(frame.alice.n_pulses)
        for name in ("pulse_index", "intensity", "basis", "bit"):
            np.testing.assert_array_equal(getattr(got.alice, name), getattr(frame.alice, name))
        for name in ("pulse_index", "basis", "bit"):
            np.testing.assert_array_equal(getattr(got.bob, name), getattr(frame.bob, name))
        assert got.ground_truth is None
    assert frame_numbers(rec, "alice") == [] == frame_numbers(rec, "bob")  # consumed: no raw key used twice
    with pytest.raises(RecordError, match="no further frame"):
        device.run_frame(frames[0].alice.n_pulses)


def _rewrite(path: Path, **changes) -> None:
    with np.load(path) as data:
        arrays = {k: data[k] for k in data.files}
    for name, value in changes.items():
        if value is None:
            del arrays[name]
        else:
            arrays[name] = value
    with open(path, "wb") as fh:
        np.savez(fh, **arrays)


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _corrupt_member(path: Path) -> None:
    """Keep the archive's directory but damage the bytes of field 'bit' (a truncated write inside the zip)."""
    with zipfile.ZipFile(path) as zf:
        info = zf.getinfo("bit.npy")
    data = bytearray(path.read_bytes())
    start = info.header_offset + 30 + len(info.filename) + len(info.extra)
    data[start + 10 : start + 60] = b"\xff" * 50
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    ("role", "damage", "field"),
    [
        ("alice", _truncate, "truncated or corrupt"),
        ("bob", lambda p: p.write_bytes(b"not a zip"), "not a readable .npz"),
        ("bob", lambda p: p.unlink(), "is missing"),
        ("alice", lambda p: _rewrite(p, intensity=None), "field 'intensity' is missing"),
        ("alice", lambda p: _rewrite(p, intensity=np.full(7, 0, np.uint8)), "field 'intensity' must be uint8"),
        ("alice", lambda p: _rewrite(p, intensity=np.full_like(np.load(p)["intensity"], 3)),
         "field 'intensity' must hold values below 3"),
        ("bob", lambda p: _rewrite(p, bit=np.load(p)["bit"].astype(np.int64)), "field 'bit' must be uint8"),
        ("bob", lambda p: _rewrite(p, basis=np.full_like(np.load(p)["basis"], 2)), "field 'basis' must hold values"),
        ("bob", lambda p: _rewrite(p, pulse_index=np.load(p)["pulse_index"][::-1].copy()),
         "field 'pulse_index' must be strictly increasing"),
        ("bob", lambda p: _rewrite(p, pulse_index=np.load(p)["pulse_index"].astype(np.int64)),
         "field 'pulse_index' must be a one-dimensional uint64"),
        ("bob", lambda p: _rewrite(p, n_pulses=np.uint64(10)), "beyond the frame's n_pulses"),
        ("alice", lambda p: _rewrite(p, format_version=np.uint16(2)), "field 'format_version' is 2"),
        ("alice", lambda p: _rewrite(p, role=np.str_("bob")), "field 'role' must be the string 'alice'"),
        ("bob", _corrupt_member, "field 'bit' cannot be read"),
    ],
)
def test_malformed_records_name_file_and_field(tmp_path, role, damage, field):
    rec, _ = _saved(tmp_path, frames=1)
    path = frame_path(rec, role, 1)
    damage(path)
    source = RecordSource(rec, role, n_intensities=3)
    with pytest.raises(RecordError) as info:
        source.take(1)
    message = str(info.value)
    assert isinstance(info.value, ProtocolAbort) and isinstance(info.value, QKDError)
    assert str(path) in message and field in message, message
    assert "\n" not in message
    assert not path.exists()  # set aside (or never there), so the next round reads the next frame
    if field != "is missing":
        assert path.with_name(path.name + ".bad").exists()


def test_bob_detections_outside_alice_record_are_refused(tmp_path):
    rec, frames = _saved(tmp_path, frames=1)
    extra = np.union1d(frames[0].bob.pulse_index, np.array([1], np.uint64))
    if extra.size == frames[0].bob.pulse_index.size:
        extra = np.union1d(frames[0].bob.pulse_index, np.array([0], np.uint64))
    _rewrite(frame_path(rec, "bob", 1), pulse_index=extra, basis=np.zeros(extra.size, np.uint8),
             bit=np.zeros(extra.size, np.uint8))
    with pytest.raises(RecordError, match="field 'pulse_index' holds detections that Alice's record does not cover"):
        RecordedDevice(PARAMS, rec).run_frame(frames[0].alice.n_pulses)


def test_frame_seconds_is_an_alternative_to_pulses_per_frame():
    assert DeviceSection(frame_seconds=0.1).pulses_per_frame == 100_000_000
    assert DeviceSection(frame_seconds=0.4, rep_rate_hz=2.5e9).pulses_per_frame == 1_000_000_000
    assert DeviceSection().pulses_per_frame == 100_000_000
    assert DeviceSection(pulses_per_frame=5000).pulses_per_frame == 5000
    with pytest.raises(ConfigError, match=r"^\[device\] frame_seconds and pulses_per_frame are alternatives"):
        DeviceSection(frame_seconds=0.1, pulses_per_frame=100_000_000)
    with pytest.raises(ConfigError, match=r"^\[device\] frame_seconds × rep_rate_hz must be a whole number"):
        DeviceSection(frame_seconds=1.0000001e-3, rep_rate_hz=1.5e6)
    with pytest.raises(ConfigError, match=r"^\[device\] frame_seconds must give at least 1000 pulses"):
        DeviceSection(frame_seconds=-1.0)
    with pytest.raises(ConfigError, match=r"^\[device\] source must be"):
        DeviceSection(source="hardware")
    with pytest.raises(ConfigError, match=r"^\[device\] records_dir is required"):
        DeviceSection(source="records")


def test_frame_seconds_in_a_site_file(tmp_path):
    layouts = deploy(tmp_path / "dep", rounds=1, pulses=None)
    config = layouts["A"].config
    text = config.read_text()
    assert "pulses_per_frame" in text
    config.write_text("\n".join(line for line in text.splitlines() if not line.startswith("pulses_per_frame"))
                      .replace("[device]", "[device]\nframe_seconds = 0.025", 1) + "\n")
    from qkdstack.node.config import load_config

    assert load_config(config).device.pulses_per_frame == 25_000_000


async def test_two_nodes_distill_from_saved_records(tmp_path):
    """Records written by `qkdstack simulate --save` feed two nodes; a truncated record aborts one round only."""
    rec = tmp_path / "records"
    # 8 frames for 2 rounds: a broken session drops the frame made ahead, and a loaded machine may break one more
    argv = ["simulate", "--distance-km", "5", "--pulses", str(PULSES), "--frames", "8", "--seed", "9",
            "--save", str(rec), "--json"]
    assert cli_main(argv) == 0
    assert frame_numbers(rec, "alice") == list(range(1, 9)) == frame_numbers(rec, "bob")
    assert (rec / "device.json").exists()
    bad = frame_path(rec, "bob", 2)
    _truncate(bad)
    out = tmp_path / "dep"
    layouts = deploy(out, rounds=2)
    for layout in layouts.values():
        edit_config(layout.config, device={"source": "records", "records_dir": str(rec)})
    await run_nodes([layouts["A"].config, layouts["B"].config], timeout=90)
    keys_a, keys_b = store_keys(out / "A"), store_keys(out / "B")
    assert keys_a and keys_a == keys_b
    # Frame 1 and a later one; frame 2 stored nothing (and the frame made ahead when that session broke is
    # dropped with it: consumed, never distilled).
    assert len(store_blocks(out / "A")) == 2 == len(store_blocks(out / "B"))
    assert 1 not in frame_numbers(rec, "alice") and 2 not in frame_numbers(rec, "bob")
    assert set(frame_numbers(rec, "alice")) <= set(frame_numbers(rec, "bob"))  # no frame read by Alice twice
    assert bad.with_name(bad.name + ".bad").exists()
    st_b = status(out / "B")
    assert st_b["rounds_accepted"] == 2
    assert any(str(bad) in line and "truncated or corrupt" in line for line in st_b["recent_aborts"]), st_b
    assert any("recorded device" in c for c in st_b["device"]["caveats"])


def test_records_dir_must_exist(tmp_path):
    from qkdstack.node.config import load_config

    layouts = deploy(tmp_path / "dep", rounds=1)
    edit_config(layouts["A"].config, device={"source": "records", "records_dir": "no-such-folder"})
    with pytest.raises(ConfigError, match=r"\[device\] records_dir names .*no-such-folder, which is not an existing"):
        load_config(layouts["A"].config)


async def test_nodes_waiting_for_records_stop_when_asked(tmp_path):
    """A transmitter waiting for its device's next frame file stops promptly when the node is stopped."""
    import asyncio
    import time

    rec = tmp_path / "records"
    (rec / "alice").mkdir(parents=True)
    out = tmp_path / "dep"
    layouts = deploy(out, rounds=2)
    for layout in layouts.values():
        edit_config(layout.config, device={"source": "records", "records_dir": str(rec)})
    loop = asyncio.get_running_loop()
    start = time.monotonic()
    until = loop.time() + 2.0
    await run_nodes([layouts["A"].config, layouts["B"].config], until=lambda nodes: loop.time() > until, timeout=30)
    assert time.monotonic() - start < 12  # 2 s of waiting, then a prompt stop (not run_nodes' 30 s give-up)
    assert status(out / "A").get("rounds_accepted", 0) == 0
