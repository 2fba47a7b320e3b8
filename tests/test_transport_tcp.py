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


# ------------------------------------------------------------------ failures of a broken connection


def _on_loop(loop_name: str, coro_fn):
    """Run ``coro_fn()`` on the default asyncio loop or on uvloop (the loop ``qkdstack node`` runs on)."""
    if loop_name == "uvloop":
        uvloop = pytest.importorskip("uvloop")  # installed only where it is built (pyproject.toml's marker)

        return uvloop.run(coro_fn())
    return asyncio.run(coro_fn())


@pytest.mark.parametrize("loop_name", ["asyncio", "uvloop"])
def test_send_on_a_connection_the_peer_killed_raises_channel_error(loop_name):
    """A peer that dies (its socket reset) makes every later send fail with ChannelError, never RuntimeError.

    uvloop raises ``RuntimeError("... the handler is closed")`` from ``writer.write`` once it has seen the
    reset; asyncio raises ConnectionResetError or nothing at all. All of them must become ChannelError.
    """

    async def scenario():
        server, client, peer, done = await _pair()
        await client.send("x.y", n=1)
        assert (await peer.recv())["n"] == 1
        peer._writer.transport.abort()  # what the kernel does for a process killed with SIGKILL: RST
        with pytest.raises(ChannelError):
            for _ in range(100):
                await client.send("x.y", payload=b"z" * 10_000)
                await asyncio.sleep(0.01)
        assert client.broken
        with pytest.raises(ChannelError, match="is down"):
            await client.send("x.y", n=2)  # fail-stop: later sends fail at once
        with pytest.raises(ChannelError, match="is down"):
            await client.recv()
        done.set()
        await client.close()
        server.close()

    _on_loop(loop_name, scenario)


@pytest.mark.parametrize("loop_name", ["asyncio", "uvloop"])
def test_recv_on_a_connection_the_peer_reset_raises_channel_error(loop_name):
    async def scenario():
        server, client, peer, done = await _pair()
        recv = asyncio.ensure_future(client.recv())
        await asyncio.sleep(0.05)
        peer._writer.transport.abort()
        with pytest.raises(ChannelError):
            await asyncio.wait_for(recv, 5)
        assert client.broken
        done.set()
        await client.close()
        server.close()

    _on_loop(loop_name, scenario)


async def test_timeout_breaks_the_channel_and_closes_the_connection():
    """After a receive timeout the stream may be cut mid-frame: the channel fails for good and the peer sees EOF."""
    server, client, peer, done = await _pair()
    peer._timeout = 0.2
    with pytest.raises(ChannelError, match=r"within 0\.2 s"):
        await peer.recv()
    assert peer.broken
    with pytest.raises(ChannelError, match="is down"):
        await peer.send("x.y")
    with pytest.raises(ChannelError, match="closed"):
        await asyncio.wait_for(client.recv(), 5)  # the peer's side learns at once, not after its own timeout
    done.set()
    await client.close()
    server.close()


async def test_keepalives_restart_the_deadline_and_reach_no_observer():
    """Empty keepalive frames keep an idle connection open past the timeout; only real messages come out of recv."""
    server, client, peer, done = await _pair()
    peer._timeout = 0.3
    seen: list[tuple[str, bytes]] = []
    peer.add_observer(lambda direction, frame: seen.append((direction, frame)))
    client_seen: list[tuple[str, bytes]] = []
    client.add_observer(lambda direction, frame: client_seen.append((direction, frame)))

    async def idle_sender():
        for _ in range(10):  # 1 s of silence, three times the timeout
            await client.keepalive()
            await asyncio.sleep(0.1)
        await client.send("x.after_idle", n=7)

    sender = asyncio.create_task(idle_sender())
    msg = await peer.recv()
    await sender
    assert msg.kind == "x.after_idle" and msg["n"] == 7
    assert peer.keepalives_received == 10
    assert len(seen) == 1 and len(client_seen) == 1  # no keepalive in a transcript
    assert peer.stats.messages() == 1
    # Without keepalives the same silence times out.
    with pytest.raises(ChannelError, match=r"within 0\.3 s"):
        await peer.recv()
    done.set()
    await client.close()
    server.close()
