"""Child process of the crash-safety test: two KMEs on real SQLite files delivering keys until killed.

Usage: python _kms_crash_child.py DIR [setup|run|finish]. ``setup`` stores identical key blocks at both
sites; ``run`` reattaches the peers (which resolves reservations left pending by an earlier kill) and
then delivers keys forever, alternating which site's SAE is master, appending to DIR/delivered.log
one line per key *after* the call returned (so after its transaction committed):
``<role> <key_ID> <sha256 of the key>`` with role M (handed to the master) or S (to the slave).
``finish`` only reattaches (recovery) and exits.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import random
import sys
from base64 import b64decode
from pathlib import Path

from qkdstack.kms.kme import KME, KMEConfig, link_pair
from qkdstack.kms.store import open_store


async def main(root: Path, mode: str) -> None:
    a = KME(KMEConfig("KME_A", "KME_B", frozenset({"SAE_A"})), open_store(root / "a.db"))
    b = KME(KMEConfig("KME_B", "KME_A", frozenset({"SAE_B"})), open_store(root / "b.db"))
    if mode == "setup":
        for i in range(6):
            block = os.urandom(32 * 200)
            await a.add_block(f"round-{i}", block)
            await b.add_block(f"round-{i}", block)
    ab, ba = link_pair(a, b)
    await a.attach_peer(ab)
    await b.attach_peer(ba)
    if mode != "run":
        a.store.close()
        b.store.close()
        return
    log = open(root / "delivered.log", "a", buffering=1)  # noqa: SIM115
    print("ready", flush=True)
    rng = random.Random()
    while True:
        master, slave = (a, b) if rng.random() < 0.5 else (b, a)
        m_sae, s_sae = ("SAE_A", "SAE_B") if master is a else ("SAE_B", "SAE_A")
        got = await master.enc_keys(m_sae, s_sae, rng.randint(1, 3), rng.choice([256, 512, 136]))
        for k in got["keys"]:
            log.write(f"M {k['key_ID']} {hashlib.sha256(b64decode(k['key'])).hexdigest()}\n")
        os.fsync(log.fileno())
        fetched = await slave.dec_keys(s_sae, m_sae, [k["key_ID"] for k in got["keys"]])
        for k in fetched["keys"]:
            log.write(f"S {k['key_ID']} {hashlib.sha256(b64decode(k['key'])).hexdigest()}\n")
        os.fsync(log.fileno())


if __name__ == "__main__":
    asyncio.run(main(Path(sys.argv[1]), sys.argv[2]))
