"""λ_EC holds against general attacks: every key-dependent bit of error correction, both directions.

Recounted from the frames themselves (decoded as they crossed), independently of the
channel's counters: Alice's Cascade parities, one decision bit of Bob for each of them (his
questions reveal how his parities compare with hers), the verification tags and the
key-basis error count of ⌈log2(n + 1)⌉ bits. The key length must be Lim 2014 Eq. (1) with
that leakage, identical at both ends.
"""

import asyncio
import math

import pytest

from qkdstack.physics.device import SimulatedDevice
from qkdstack.physics.eve import parse_eve
from qkdstack.physics.params import ChannelParams, DeviceParams, ReceiverParams, SourceParams
from qkdstack.protocol import round as round_mod
from qkdstack.protocol.channel import SENT, channel_pair
from qkdstack.protocol.keyblock import KeyBlock
from qkdstack.protocol.round import RoundConfig
from qkdstack.theory.finite import DecoyCounts, lim2014_secret_length
from qkdstack.transport.codec import decode_message

PARAMS = DeviceParams(
    source=SourceParams(intensities=(0.5, 0.25, 0.0), intensity_probs=(0.4, 0.4, 0.2), p_z=0.8),
    channel=ChannelParams(length_km=25),
    receiver=ReceiverParams(p_z=0.8),
)
CONFIG = RoundConfig.for_source(PARAMS.source)


@pytest.fixture(scope="module")
def logged_round():
    """An eavesdropper-free 25 km round; every frame Alice's end sent or received, decoded."""
    frame = SimulatedDevice(PARAMS, eve=parse_eve("none"), seed=7).run_frame(60_000_000)

    async def run():
        a_chan, b_chan = channel_pair()
        log: list[tuple[str, bytes]] = []
        a_chan.add_observer(lambda direction, data: log.append((direction, data)))
        a, b = await asyncio.gather(
            round_mod.alice(a_chan, frame.alice, CONFIG), round_mod.bob(b_chan, frame.bob, CONFIG)
        )
        return a, b, [(direction, *decode_message(data)) for direction, data in log]

    return asyncio.run(run())


def _disclosed(msgs, kinds, direction):
    return sum(len(d) for dr, kind, _f, d in msgs if dr == direction and kind in kinds and d is not None)


def test_leakage_counts_bobs_decisions_and_the_error_count(logged_round):
    a, b, msgs = logged_round
    assert isinstance(a, KeyBlock) and isinstance(b, KeyBlock)
    parities = _disclosed(msgs, {"cascade.start", "cascade.parities"}, SENT)  # Alice → Bob
    tags = _disclosed(msgs, {"verification.tag"}, SENT)
    n_key = int(sum(a.counts["key_counts"]))
    error_bits = math.ceil(math.log2(n_key + 1))
    strict = 2 * parities + tags + error_bits
    assert parities > 10_000 and tags >= 64
    for block in (a, b):
        lam = block.finite_key["leakage_bits"]
        assert lam >= strict  # at least: Alice's parities, one Bob bit per parity, tags, the error count
        acc = block.leakage_accounting
        assert acc["rule"] == "all-disclosed-both-directions" and acc["lambda_bits"] == lam
        assert acc["stages"]["cascade"] == {"alice_to_bob": parities, "bob_to_alice": parities}
        assert acc["stages"]["verification"] == {"alice_to_bob": tags, "bob_to_alice": error_bits}
        assert block.leakage_bits == {"cascade": 2 * parities, "verification": tags + error_bits}
    # both ends read the same frames: the same proof, the same ℓ, the same key
    assert a.leakage_accounting == b.leakage_accounting and a.key == b.key


def test_key_length_is_eq1_with_the_strict_leakage(logged_round):
    a, _b, msgs = logged_round
    counts = DecoyCounts(PARAMS.source.intensities, PARAMS.source.intensity_probs, a.counts["key_counts"],
                         a.counts["test_counts"], a.counts["test_errors"])
    lam = a.finite_key["leakage_bits"]
    assert a.length == lim2014_secret_length(counts, lam, a.eps_sec, a.eps_cor).length
    parities = _disclosed(msgs, {"cascade.start", "cascade.parities"}, SENT)
    alice_only = lim2014_secret_length(counts, parities + 128, a.eps_sec, a.eps_cor).length
    assert a.length <= alice_only - parities  # Bob's decision bits cost at least one bit each
    # the tag bits are counted as leakage AND Eq. (1) keeps its log2(2/ε_cor) term (conservative, docs say so)
    assert a.finite_key["verification_bits"] == pytest.approx(math.log2(2 / a.eps_cor))


def test_eavesdropper_free_25_km_round_still_yields_a_key(logged_round):
    a, b, _ = logged_round
    assert a.length > 10_000 and a.key == b.key
