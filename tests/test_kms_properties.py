"""Property test: random interleavings of enc_keys / dec_keys in both directions, with peer-link failures.

Invariants after every sequence: no key ID or key bytes handed out twice, every slave gets the master's
bytes, counters equal a full recount, and the two stores agree chunk by chunk after a resync. Some
sequences store key blocks at one site only (orphans), which the master sites drop as they meet them.
"""

from __future__ import annotations

import asyncio

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from _kms_support import Sites, StoreFactory
from qkdstack.kms.kme import KMEError

OPS = st.lists(
    st.one_of(
        st.tuples(st.just("enc"), st.booleans(), st.integers(1, 4), st.sampled_from([64, 136, 256, 512, 1024])),
        st.tuples(st.just("dec"), st.booleans(), st.integers(0, 10**6), st.just(0)),
        st.tuples(st.just("link"), st.sampled_from(["up", "down", "lose"]), st.just(0), st.just(0)),
        st.tuples(st.just("orphan"), st.booleans(), st.integers(1, 12), st.just(0)),
    ),
    max_size=25,
)


@settings(max_examples=20, deadline=None, suppress_health_check=list(HealthCheck))
@given(ops=OPS)
def test_random_operations_keep_every_invariant(tmp_path_factory, ops):
    asyncio.run(_scenario(tmp_path_factory.mktemp("prop"), ops))


async def _scenario(tmp, ops) -> None:
    s = await Sites(StoreFactory("sqlite", tmp), blocks=2, block_bytes=32 * 40, orphan_grace_s=0.0).start()
    try:
        handed: dict[str, str] = {}  # key ID -> base64 key, from enc_keys
        waiting: list[tuple[bool, str]] = []  # (taken at A?, key ID) not yet fetched by the slave
        for i, (op, flag, n, size) in enumerate(ops):
            if op == "orphan":  # a key block at one site only: it must cost its own keys only
                await s.add_orphan(flag, f"orphan-{i}", n)
                await s.add_block(f"after-orphan-{i}")
                continue
            if op == "link":
                for link in (s.link_ab, s.link_ba):
                    link.down, link.lose_replies = flag == "down", flag == "lose"
                continue
            if op == "enc":
                kme, master, slave = (s.a, "SAE_A", "SAE_B") if flag else (s.b, "SAE_B", "SAE_A")
                try:
                    got = await kme.enc_keys(master, slave, n, size)
                except KMEError as exc:
                    assert exc.status == 503
                    continue
                for k in got["keys"]:
                    assert k["key_ID"] not in handed and k["key"] not in handed.values()
                    handed[k["key_ID"]] = k["key"]
                    waiting.append((flag, k["key_ID"]))
            elif waiting:
                at_a, kid = waiting.pop(n % len(waiting))
                kme, me, master = (s.b, "SAE_B", "SAE_A") if at_a else (s.a, "SAE_A", "SAE_B")
                got = await kme.dec_keys(me, master, [kid])
                assert got["keys"][0]["key"] == handed[kid]
                try:
                    await kme.dec_keys(me, master, [kid])
                    raise AssertionError("a key was delivered twice")
                except KMEError as exc:
                    assert exc.status == 400
        for link in (s.link_ab, s.link_ba):
            link.down = link.lose_replies = False
        await asyncio.sleep(0)
        await s.a.resync()
        await s.b.resync()
        await s.agree()
    finally:
        await s.stop()
