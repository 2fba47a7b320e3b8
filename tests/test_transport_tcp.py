import asyncio
import struct

import numpy as np
import pytest

from qkdstack.bits import BitArray
from qkdstack.errors import ChannelError
from qkdstack.transport.tcp import TcpChannel, connect, serve


async def _pair():
    accepted: asyncio.Queue[TcpChannel] = asyncio.Queue()
    done = asyncio.Event()

    async def handler(ch):
        await accepted.put(ch)
        await done.wait()

    server = await serve("127.0.0.1", 0, handler)
    port = server.sockets[0].getsockname()[1]
    client = await connect("127.0.0.1", port)
    peer = await accepted.get()
    return server, client, peer, done


async def test_messages_cross_tcp_with_counters():
    server, client, peer, done = await _pair()
    bits = BitArray.from_bits(np.random.default_rng(0).integers(0, 2, 10_001))
    await client.send("cascade.parities", disclosed=bits, idx=np.arange(5, dtype=np.uint32))
    msg = await peer.recv(expect="cascade.parities")
    assert msg.disclosed == bits and msg["idx"].tolist() == [0, 1, 2, 3, 4]
    assert peer.stats.disclosed_bits("cascade") == 10_001
    done.set()
    await client.close()
    server.close()


async def test_out_of_sequence_frame_rejected():
    server, client, peer, done = await _pair()
    # Write a raw frame with a wrong sequence number, as a replaying relay would.
    from qkdstack.transport.codec import encode_message

    frame = encode_message("x.y", {}, None)
    client._writer.write(struct.pack(">IQ", len(frame) + 8, 5) + frame)
    await client._writer.drain()
    with pytest.raises(ChannelError, match="out of sequence"):
        await peer.recv()
    done.set()
    await client.close()
    server.close()


async def test_oversized_frame_refused_and_close_detected():
    server, client, peer, done = await _pair()
    peer._max = 10
    await client.send("x.y", data=b"z" * 100)
    with pytest.raises(ChannelError, match="refused"):
        await peer.recv()
    await client.close()
    with pytest.raises(ChannelError):
        await peer.recv()
    done.set()
    server.close()


async def test_connect_gives_up_with_clear_error():
    with pytest.raises(ChannelError, match="cannot reach"):
        await connect("127.0.0.1", 1, attempts=2, delay=0.01)
