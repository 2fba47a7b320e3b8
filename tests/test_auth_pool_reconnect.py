"""Regression: an entity-authentication round (empty refill) must not retire the PSK seed.

Before the fix, committing the empty round of ``authenticate_peer`` retired the seed while the
first real round's refill was still pending, so round 3 found the pool empty.
"""

import asyncio
import secrets

from qkdstack.auth.psk import generate_psk_file, pool_from_psk
from qkdstack.auth.session import authenticate_peer, begin_round
from qkdstack.protocol.channel import channel_pair


async def test_rounds_after_entity_authentication_keep_paying(tmp_path):
    generate_psk_file(tmp_path / "link.psk", link_id="A-B")
    pool_a, pool_b = pool_from_psk(tmp_path / "link.psk"), pool_from_psk(tmp_path / "link.psk")
    ca, cb = channel_pair()
    await asyncio.gather(authenticate_peer(ca, pool_a, "alice", 1), authenticate_peer(cb, pool_b, "bob", 1))
    consumed = []
    for round_id in range(2, 9):
        key = secrets.token_bytes(6000)

        async def side(channel, pool, role, key=key, round_id=round_id):
            auth = await begin_round(channel, pool, role, round_id)
            if role == "alice":
                await channel.send("stage.x", v=round_id)
            else:
                await channel.recv("stage.x")
            return await auth.finish(key)

        out_a, out_b = await asyncio.gather(side(ca, pool_a, "alice"), side(cb, pool_b, "bob"))
        assert out_a.key_for_store == out_b.key_for_store
        consumed.append(out_a.consumed_bits)
    assert pool_a.lockstep_digest() == pool_b.lockstep_digest()
    assert consumed[-1] == 256  # steady state: one 128-bit pad per direction
    assert pool_a.rounds_affordable() > 1
