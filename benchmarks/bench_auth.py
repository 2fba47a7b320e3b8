"""Authentication benchmark: Wegman–Carter throughput, transcript MAC cost, key bits per round, bootstrap signatures.

Figures:
* ``wc_mac_throughput_byte_per_s`` - Poly1305 Wegman–Carter tags over 16 MiB messages (hash + pad);
* ``transcript_mac_throughput_byte_per_s`` - a round transcript of 1,000 frames of 4 KiB, recorded by
  the observer and tagged twice (one tag per direction), as a round does;
* ``round_auth_overhead_s`` - wall time of ``begin_round`` + ``finish`` for a round with one data
  message each way over the in-memory channel (sync, reservation, persistence off, tags);
* ``key_bits_per_round_steady`` / ``key_bits_per_round_refresh`` - pool consumption per round
  (both directions) with a recycled hash key / after a failure or at bootstrap;
* ``min_round_key_bits_for_1pct`` - the round key size above which authentication costs < 1 % of it;
* ``pki_sign_s`` / ``pki_verify_s`` - dual (Ed25519 + ML-DSA-65) transcript signature and chain verification.
"""

from __future__ import annotations

import asyncio
import secrets
import time

from qkdstack import certs
from qkdstack.auth.pki import PkiIdentity, TrustAnchors, sign_transcript, verify_transcript
from qkdstack.auth.pool import AuthKeyPool
from qkdstack.auth.session import begin_round
from qkdstack.auth.wegman_carter import TranscriptMac, WegmanCarterMac
from qkdstack.protocol.channel import channel_pair


def _best(fn, repeat: int = 5) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


async def _rounds(n: int) -> tuple[float, list[int]]:
    seed = secrets.token_bytes(1024)
    pa, pb = AuthKeyPool.from_seed("bench", seed), AuthKeyPool.from_seed("bench", seed)
    ca, cb = channel_pair(10)
    key = secrets.token_bytes(4096)
    consumed = []

    async def side(ch, pool, role, rid):
        auth = await begin_round(ch, pool, role, rid)
        if role == "alice":
            await ch.send("bench.data", v=b"x" * 1000)
            await ch.recv("bench.data")
        else:
            await ch.recv("bench.data")
            await ch.send("bench.data", v=b"y" * 1000)
        return await auth.finish(key)

    t = time.perf_counter()
    for rid in range(1, n + 1):
        oa, _ = await asyncio.gather(side(ca, pa, "alice", rid), side(cb, pb, "bob", rid))
        consumed.append(oa.consumed_bits)
    return (time.perf_counter() - t) / n, consumed


def run() -> dict:
    mac = WegmanCarterMac(secrets.token_bytes(16))
    pad = secrets.token_bytes(16)
    msg = secrets.token_bytes(16 * 2**20)
    t_mac = _best(lambda: mac.tag(msg, pad))

    frames = [secrets.token_bytes(4096) for _ in range(1000)]

    def transcript() -> None:
        tm = TranscriptMac("alice", "bench", 1)
        for i, f in enumerate(frames):
            tm.observe("sent" if i % 2 else "received", f)
        tm.tag(mac, pad)
        tm.tag(WegmanCarterMac(secrets.token_bytes(16)), pad)

    t_tr = _best(transcript)
    per_round, consumed = asyncio.run(_rounds(50))
    steady = min(consumed)
    refresh = max(consumed)

    cca, ccak = certs.make_ca("bench classical", key_kind="ed25519")
    qca, qcak = certs.make_ca("bench pq", key_kind="ml-dsa-65")
    ck, qk = certs.generate_key("ed25519"), certs.generate_key("ml-dsa-65")
    ident = PkiIdentity(
        "node",
        ck,
        (certs.issue_certificate(cca, ccak, "node", ck.public_key(), client=False, server=False, signing=True),),
        qk,
        (certs.issue_certificate(qca, qcak, "node", qk.public_key(), client=False, server=False, signing=True),),
    )
    trust = TrustAnchors((cca,), (qca,), (certs.make_crl(cca, ccak, []), certs.make_crl(qca, qcak, [])))
    digest = secrets.token_bytes(32)
    bundle = sign_transcript(ident, digest)
    t_sign = _best(lambda: sign_transcript(ident, digest), 20)
    t_verify = _best(lambda: verify_transcript(bundle, digest, trust, "node"), 20)
    return {
        "wc_mac_throughput_byte_per_s": len(msg) / t_mac,
        "transcript_mac_throughput_byte_per_s": 2 * sum(map(len, frames)) / t_tr,
        "round_auth_overhead_s": per_round,
        "key_bits_per_round_steady": steady,
        "key_bits_per_round_refresh": refresh,
        "min_round_key_bits_for_1pct": 100 * steady,
        "pki_sign_s": t_sign,
        "pki_verify_s": t_verify,
        "note": "2-core machine shared with other jobs: timings are noisy",
    }


if __name__ == "__main__":
    import json

    print(json.dumps(run(), indent=2))
