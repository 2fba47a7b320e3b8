import asyncio
import contextlib

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from qkdstack.bits import BitArray
from qkdstack.errors import ChannelError
from qkdstack.protocol.channel import RECEIVED, SENT, channel_pair
from qkdstack.transport.codec import decode_message, encode_message


async def test_message_roundtrip_and_counters():
    alice, bob = channel_pair()
    parities = BitArray.from_bits([1, 0, 1, 1, 0])
    idx = np.arange(10, dtype=np.uint64)
    await alice.send("cascade.parities", disclosed=parities, blocks=idx, note="x", nested={"a": [1, 2.5, None]})
    msg = await bob.recv(expect="cascade.parities")
    assert msg.disclosed == parities
    assert np.array_equal(msg["blocks"], idx) and msg["blocks"].dtype == np.uint64
    assert msg["nested"] == {"a": [1, 2.5, None]}
    assert alice.stats.disclosed_bits("cascade") == 5 == bob.stats.disclosed_bits("cascade")
    await bob.send("cascade.ask", disclosed=BitArray.from_bits([1, 1, 0]))
    await alice.recv(expect="cascade.ask")
    assert alice.stats.disclosed_bits("cascade", SENT) == 5 == bob.stats.disclosed_bits("cascade", RECEIVED)
    assert alice.stats.disclosed_bits("cascade", RECEIVED) == 3 == bob.stats.disclosed_bits("cascade", SENT)
    assert alice.stats.disclosed_bits("cascade") == 8 == bob.stats.disclosed_bits("cascade")
    assert alice.stats.counters[("cascade", SENT)].wire_bytes == bob.stats.counters[("cascade", RECEIVED)].wire_bytes


async def test_unexpected_kind_is_a_protocol_error():
    alice, bob = channel_pair()
    await alice.send("sifting.bases")
    with pytest.raises(ChannelError, match="expected"):
        await bob.recv(expect="cascade.parities")


async def test_recv_times_out():
    _, bob = channel_pair(timeout=0.01)
    with pytest.raises(ChannelError, match="no message"):
        await bob.recv()


async def test_observers_see_every_frame_in_order():
    alice, bob = channel_pair()
    seen = []
    alice.add_observer(lambda d, f: seen.append((d, len(f))))
    await alice.send("a.x", v=1)
    await bob.send("a.y", v=2)
    await alice.recv()
    assert [d for d, _ in seen] == [SENT, RECEIVED]
    await asyncio.sleep(0)


@given(st.binary(max_size=200))
def test_decoder_never_crashes_on_garbage(data):
    with contextlib.suppress(ChannelError):
        decode_message(b"Q1" + data)


def test_truncated_frame_is_rejected():
    frame = encode_message("x.y", {"a": np.arange(100, dtype=np.uint32)}, None)
    for cut in (3, 10, len(frame) - 1):
        with pytest.raises(ChannelError):
            decode_message(frame[:cut])


def test_codec_roundtrips_buffers_arrays_and_bit_arrays():
    raw = bytes(range(256)) * 3
    fields = {
        "b": raw,
        "ba": bytearray(raw[:10]),
        "mv": memoryview(raw)[5:9],
        "mv2": memoryview(np.arange(4, dtype=np.uint32)),
        "m": np.arange(12, dtype=np.int16).reshape(3, 4),
        "t": np.arange(12, dtype=np.float64).reshape(3, 4).T,  # not contiguous
        "e": np.zeros((0, 3), dtype=np.uint8),
        "flags": np.array([True, False, True]),
        "bits": BitArray.from_bits(np.arange(13) % 3 == 0),
        "empty_bits": BitArray.zeros(0),
    }
    kind, out, disclosed = decode_message(encode_message("x.y", fields, BitArray.from_bits([1, 1, 0])))
    assert kind == "x.y" and disclosed == BitArray.from_bits([1, 1, 0])
    assert out["b"] == raw and out["ba"] == raw[:10] and out["mv"] == raw[5:9]
    assert out["mv2"] == np.arange(4, dtype=np.uint32).tobytes()
    for name in ("m", "t", "e", "flags"):
        assert out[name].dtype == fields[name].dtype and np.array_equal(out[name], fields[name])
        assert out[name].flags.writeable
    assert out["bits"] == fields["bits"] and len(out["empty_bits"]) == 0
