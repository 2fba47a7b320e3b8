"""Security review findings on the node (issue 10): a lost pool file is not re-seeded from the PSK, a forged
hello cannot make one end drop its pool, a restored pool backup is refused, and every key's proof says
which device made it and its composed ε."""

from __future__ import annotations

import asyncio
import json
import secrets
import subprocess
import sys
from pathlib import Path

import pytest

from _node_support import deploy, run_nodes, status
from qkdstack.auth.pool import AuthKeyPool
from qkdstack.auth.session import authenticate_round
from qkdstack.errors import AuthenticationError
from qkdstack.node.config import load_config
from qkdstack.node.service import Node
from qkdstack.protocol.channel import channel_pair


async def test_lost_pool_file_is_not_reseeded_from_the_psk(tmp_path):
    out = tmp_path / "dep"
    layouts = deploy(out, "psk", rounds=1)
    await run_nodes([layouts["A"].config, layouts["B"].config], timeout=90)
    for site in "AB":
        st = status(out / site)
        # every key's proof: the device's caveats and the composed ε; the link's running total
        assert st["device"]["simulated"] is True and st["device"]["caveats"]
        assert st["epsilon"]["link_total"] >= st["epsilon"]["key_blocks"] > 0
        last = json.loads((out / site / "data" / "rounds.jsonl").read_text().splitlines()[-1])
        proof = last["proof"]
        assert proof["provenance"]["device"]["simulated"] is True
        eps = proof["provenance"]["epsilon_composed"]
        assert eps >= proof["eps_sec"] + proof["eps_cor"] + proof["provenance"]["authentication"]["epsilon"] * 0.999
    (out / "A" / "data" / "auth-pool.json").unlink()  # disk loss, or an operator "resetting" the link
    run = subprocess.run(
        [str(Path(sys.executable).with_name("qkdstack")), "node", "--config", str(layouts["A"].config)],
        capture_output=True, text=True, timeout=120,
    )
    assert run.returncode == 2, run.stderr[-2000:]
    assert "[auth] psk_file" in run.stderr and "consumed" in run.stderr and "qkdstack psk" in run.stderr
    assert "Traceback" not in run.stderr
    assert not (out / "A" / "data" / "auth-pool.json").exists()


def _node(tmp_path: Path, bootstrap: str) -> Node:
    layouts = deploy(tmp_path / "dep", bootstrap, rounds=1)
    node = Node(load_config(layouts["A"].config))
    node._load_state()
    return node


async def test_forged_hello_cannot_make_one_end_drop_its_pool(tmp_path):
    """pki/pgp: a hello saying "no pool" makes a fresh pool bootstrap again, but the pool is kept until a new
    signed bootstrap succeeds (issue 10, item 7); an established pool is never given up."""
    node = _node(tmp_path, "pki")
    pool = AuthKeyPool.from_seed(node.link_id, secrets.token_bytes(1024), path=node.pool_path)
    node.pool = pool
    mine, forger = channel_pair(5)

    async def forged_peer() -> None:
        await forger.recv("link.hello")
        await forger.send("link.hello", pool=False, psk_check=None)

    await asyncio.gather(node._reconcile_pools(mine), forged_peer())
    assert node.pool is pool and node._rebootstrap and node.pool_path.exists()
    # once the pool has authenticated a round, the same hello is refused and nothing changes
    pool._stats["rounds_authenticated"] = 1
    node._rebootstrap = False
    with pytest.raises(AuthenticationError, match="never discarded on the peer's word"):
        await asyncio.gather(node._reconcile_pools(mine), forged_peer())
    assert node.pool is pool and not node._rebootstrap


async def test_restored_pool_backup_is_refused_before_any_tag(tmp_path):
    """A site restored from a backup of its pool is refused by the peer's lockstep check (no pad reused)."""
    from test_auth_epsilon_psk import _round

    async def _stages(ch, key):
        return key

    seed = secrets.token_bytes(512)
    pa, pb = AuthKeyPool.from_seed("A-B", seed), AuthKeyPool.from_seed("A-B", seed)
    ca, cb = channel_pair(2)
    await _round(ca, cb, pa, pb, 1, secrets.token_bytes(4000))
    backup = pb.to_bytes()
    for rid in (2, 3):
        await _round(ca, cb, pa, pb, rid, secrets.token_bytes(4000))
    restored = AuthKeyPool.from_bytes(backup)
    sent: list[bytes] = []
    cb.add_observer(lambda direction, frame: sent.append(frame) if direction == "sent" else None)
    key = secrets.token_bytes(4000)
    ra, rb = await asyncio.gather(
        authenticate_round(ca, pa, "alice", 4, lambda: _stages(ca, key)),
        authenticate_round(cb, restored, "bob", 4, lambda: _stages(cb, key)),
        return_exceptions=True,
    )
    for refusal in (ra, rb):
        assert isinstance(refusal, AuthenticationError) and "restored from a backup" in str(refusal)
    assert not any(b"auth.tag" in f for f in sent)  # the restored end computed no tag
