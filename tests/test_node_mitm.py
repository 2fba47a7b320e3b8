"""A man in the middle on the classical link between two nodes: every tampering aborts the round, no key of
that round reaches either store, and the link recovers.

The relay sits between the transmitter (A, whose ``[link] classical`` points at the relay) and the receiver
(B, listening on the real port). It parses the transport frames (4-byte big-endian length, 8-byte sequence
number, codec frame; see :mod:`qkdstack.transport.tcp`) and, in round ``TARGET_ROUND`` (counted by the
``round.start`` frames it forwards), tampers with Alice's ``amplification.seed`` frame: the last message of
the round before the tags, whose alteration no protocol check can notice (only the transcript MAC can).

Two families of attacks:

* sequence-consistent: the relay renumbers the following frames so the transport sees an unbroken
  sequence; what is left to catch the attack is the protocol's message order and, for ``flip`` and
  ``forge``, only the Wegman–Carter transcript tags;
* ``*-raw``: frames keep their original sequence numbers, which the transport itself rejects.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import struct

import pytest

from _node_support import deploy, edit_config, free_base_port, run_nodes, status, store_blocks, store_keys
from qkdstack.bits import BitArray
from qkdstack.transport.codec import decode_message, encode_message

HEADER = struct.Struct(">IQ")
TARGET_KIND = "amplification.seed"
TARGET_ROUND = 1  # 0-based: round 0 is clean (gives the replay attack an old frame), round 1 is tampered


class Relay:
    """An asyncio TCP proxy that forwards B→A untouched and applies ``attack`` to one A→B frame."""

    def __init__(
        self, listen_port: int, target_port: int, attack: str, target_round: int = TARGET_ROUND, kind: str = TARGET_KIND
    ) -> None:
        self.listen_port = listen_port
        self.target_round = target_round
        self.kind = kind
        self.target_port = target_port
        self.attack = attack
        self.block_ids: list[str] = []
        self.connections = 0
        self.done = False
        self._old_seed: bytes | None = None
        self._server: asyncio.Server | None = None

    async def __aenter__(self) -> Relay:
        self._server = await asyncio.start_server(self._on_client, "127.0.0.1", self.listen_port)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()

    async def _on_client(self, a_reader: asyncio.StreamReader, a_writer: asyncio.StreamWriter) -> None:
        try:
            b_reader, b_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            a_writer.close()
            return
        self.connections += 1
        tasks = [
            asyncio.create_task(self._a_to_b(a_reader, b_writer)),
            asyncio.create_task(self._copy(b_reader, a_writer)),
        ]
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        for t in tasks:
            t.cancel()
            with contextlib.suppress(BaseException):
                await t
        for w in (a_writer, b_writer):
            w.close()

    @staticmethod
    async def _copy(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            while data := await reader.read(1 << 16):
                writer.write(data)
                await writer.drain()

    def _forged(self, fields: dict) -> bytes:
        """A well-formed seed message with Alice's lengths and a fresh random seed (the relay's own)."""
        n = len(fields["seed"])
        seed = BitArray.from_bytes(secrets.token_bytes((n + 7) // 8), n)
        return encode_message(TARGET_KIND, dict(fields, seed=seed), None)

    async def _a_to_b(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        offset = 0  # added to the sequence number of every later frame on this connection (renumbering)
        held: tuple[int, bytes] | None = None  # reorder: the target frame, sent after the next one

        def send(seq: int, body: bytes) -> None:
            writer.write(HEADER.pack(len(body) + 8, seq) + body)

        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            while True:
                length, seq = HEADER.unpack(await reader.readexactly(HEADER.size))
                body = await reader.readexactly(length - 8)
                kind, fields, _ = decode_message(body)
                if kind == "round.start":
                    self.block_ids.append(str(fields["block_id"]))
                if held is not None:  # reorder: this frame first, then the held target frame
                    raw = self.attack.endswith("-raw")
                    send(seq if raw else seq - 1 + offset, body)
                    send(held[0] if raw else seq + offset, held[1])
                    held = None
                elif kind == self.kind and len(self.block_ids) == self.target_round + 1 and not self.done:
                    self.done = True
                    offset, held = self._tamper(send, seq, offset, body, fields)
                else:
                    send(seq + offset, body)
                    if kind == TARGET_KIND:
                        self._old_seed = body
                await writer.drain()

    def _tamper(self, send, seq: int, offset: int, body: bytes, fields: dict) -> tuple[int, tuple[int, bytes] | None]:
        s = seq + offset
        match self.attack:
            case "flip":  # one bit inside the Toeplitz seed
                flipped = bytearray(body)
                flipped[len(body) // 2] ^= 0x10
                send(s, bytes(flipped))
            case "forge":  # the whole frame replaced by the relay's own well-formed one
                send(s, self._forged(fields))
            case "drop":
                offset -= 1
            case "drop-raw":
                pass
            case "replay":  # the previous round's seed frame instead of this round's
                assert self._old_seed is not None
                send(s, self._old_seed)
            case "replay-raw":  # the frame twice, under the same sequence number
                send(s, body)
                send(s, body)
            case "inject":  # a forged frame before the genuine one
                send(s, self._forged(fields))
                send(s + 1, body)
                offset += 1
            case "inject-raw":
                send(s, self._forged(fields))
                send(s, body)
            case "reorder" | "reorder-raw":
                return offset, (seq, body)
            case _:
                raise AssertionError(self.attack)
        return offset, None


CRYPTO_ONLY = {"flip", "forge"}
# The default run keeps the two MAC-only attacks, the replay and one transport-level attack; the rest
# (each a node pair running three or four rounds, ~10 s) run with the slow tests.
ATTACKS = [
    "flip",
    "forge",
    "replay",
    "drop-raw",
    pytest.param("drop", marks=pytest.mark.slow),
    pytest.param("reorder", marks=pytest.mark.slow),
    pytest.param("inject", marks=pytest.mark.slow),
    pytest.param("replay-raw", marks=pytest.mark.slow),
    pytest.param("reorder-raw", marks=pytest.mark.slow),
    pytest.param("inject-raw", marks=pytest.mark.slow),
]


@pytest.mark.parametrize("attack", ATTACKS)
async def test_mitm_tampering_aborts_round_and_link_recovers(tmp_path, attack):
    base = free_base_port(extra=1)
    out = tmp_path / "dep"
    layouts = deploy(out, "psk", rounds=3, base_port=base)
    relay_port = base + 20
    edit_config(layouts["A"].config, link={"classical": f"127.0.0.1:{relay_port}"})
    async with Relay(relay_port, base, attack) as relay:
        await run_nodes([layouts["A"].config, layouts["B"].config], timeout=90)
    assert relay.done, "the attack never ran"
    tampered = relay.block_ids[TARGET_ROUND]
    later = relay.block_ids[TARGET_ROUND + 1 :]
    sts = {s: status(out / s) for s in "AB"}
    aborts = {s: " | ".join(sts[s]["recent_aborts"]) for s in "AB"}
    print(f"{attack}: A: {aborts['A']}\n{attack}: B: {aborts['B']}")

    # The tampered round aborted at both ends, with its stage and reason in status.json.
    for s in "AB":
        assert aborts[s], f"{s} recorded no abort: {sts[s]}"
    if attack in CRYPTO_ONLY:
        # Only the transcript MAC can see this: B's check of A's tag fails and A hears B's refusal.
        for s in "AB":
            assert sts[s]["rounds_aborted"] == 1, sts[s]
            assert "authentication:" in aborts[s], aborts[s]
        assert "did not verify" in aborts["B"]
    if attack.endswith("-raw"):
        assert "out of sequence" in aborts["B"], aborts["B"]

    # No key of the tampered round in either store; both stores identical; later rounds accepted again.
    blocks_a, blocks_b = store_blocks(out / "A"), store_blocks(out / "B")
    assert tampered not in blocks_a and tampered not in blocks_b
    assert blocks_a == blocks_b and relay.block_ids[0] in blocks_a
    assert set(later) & blocks_a, f"no round after the attack was accepted: {sts}"
    keys_a = store_keys(out / "A")
    assert keys_a and keys_a == store_keys(out / "B")
    for s in "AB":
        assert sts[s]["rounds_accepted"] == len(blocks_a) == 1 + len(set(later) & blocks_a)
        assert sts[s]["last_round"]["accepted"] is True


async def test_mitm_during_pki_bootstrap_detected(tmp_path):
    """A bit flipped in the signature-authenticated bootstrap round: the transcript signature check refuses
    it at both ends, nothing is seeded or stored from it, and the next round bootstraps the link."""
    base = free_base_port(extra=1)
    out = tmp_path / "dep"
    layouts = deploy(out, "pki", rounds=3, base_port=base)
    relay_port = base + 20
    edit_config(layouts["A"].config, link={"classical": f"127.0.0.1:{relay_port}"})
    async with Relay(relay_port, base, "flip", target_round=0) as relay:
        await run_nodes([layouts["A"].config, layouts["B"].config], timeout=90)
    assert relay.done
    sts = {s: status(out / s) for s in "AB"}
    for s in "AB":
        aborts = " | ".join(sts[s]["recent_aborts"])
        assert sts[s]["rounds_aborted"] == 1 and sts[s]["rounds_accepted"] == 2, sts[s]
        assert "bootstrap refused" in aborts and "bad-signature" in aborts, aborts
        assert sts[s]["auth_pool"] is not None
    blocks = store_blocks(out / "A")
    assert relay.block_ids[0] not in blocks and blocks == store_blocks(out / "B") == set(relay.block_ids[1:])
    assert store_keys(out / "A") == store_keys(out / "B")


async def test_lost_bootstrap_confirmation_recovers(tmp_path):
    """The relay drops the last bootstrap message (``auth.done``): A has seeded its pool, B has not.

    At the next connection the ends compare notes (``link.hello``); A discards its pool, which has
    authenticated nothing yet, with the bootstrap round's pending key, and the link bootstraps again.
    Both stores end up identical (before the fix, A kept a key B never had and the link wedged).
    """
    base = free_base_port(extra=1)
    out = tmp_path / "dep"
    layouts = deploy(out, "pki", rounds=3, base_port=base)
    relay_port = base + 20
    edit_config(layouts["A"].config, link={"classical": f"127.0.0.1:{relay_port}"})
    async with Relay(relay_port, base, "drop", target_round=0, kind="auth.done") as relay:
        await run_nodes([layouts["A"].config, layouts["B"].config], timeout=90)
    assert relay.done
    blocks = store_blocks(out / "A")
    assert relay.block_ids[0] not in blocks and blocks == store_blocks(out / "B")
    assert len(blocks) == 2 and store_keys(out / "A") == store_keys(out / "B")
    assert status(out / "B")["reconnections"] >= 1 and status(out / "B")["rounds_accepted"] == 2
    assert not (out / "A" / "data" / "pending" / "0.json").exists()
