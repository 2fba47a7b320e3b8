"""One distillation round: sifting → estimation → Cascade or LDPC → verification → amplification.

:func:`alice` and :func:`bob` each run their party's half over a shared
:class:`~qkdstack.protocol.channel.Channel` and return a
:class:`~qkdstack.protocol.keyblock.KeyBlock` or an
:class:`~qkdstack.protocol.keyblock.Abort`. Nothing partial survives an abort: the
round's intermediate bits go out of scope and no key is returned.

The secret length is Lim et al., PRA 89, 022307 (2014), Eq. (1), evaluated with the
*measured* counts and the *measured* leakage λ: every bit the channel counted as disclosed
in the Cascade and verification stages, in both directions (rule :data:`LEAKAGE_RULE`):

* Alice's Cascade parities (Alice → Bob);
* Bob's Cascade decision bits, one per parity of Alice (Bob → Alice): his questions reveal
  how his parities compare with hers, so against general attacks they count too (the
  argument is in :mod:`qkdstack.protocol.cascade`);
* the verification tags (Alice → Bob);
* the key-basis error count, ⌈log2(n + 1)⌉ bits for n sifted key bits (Bob → Alice).

We subtract the verification tag bits as measured leakage *and* keep Eq. (1)'s
log2(2/ε_cor) term, which is conservative by at most a few hundred bits per block. Each
block's proof (``KeyBlock.leakage_accounting``) records the rule and these bits per stage
and direction; both parties read them from their own channel counters of the same frames,
so they compute the same ℓ.

Round framing: Alice opens with ``round.start`` (a fresh block ID from the OS CSPRNG and
the protocol parameters, which Bob checks against his own configuration); Bob answers
``round.ready``. Abort notices left over from an earlier round on a long-lived channel
are skipped at this point by their block ID.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from qkdstack.bits import BitArray
from qkdstack.errors import ChannelError, ConfigError, PeerAbort, ProtocolAbort
from qkdstack.physics.params import SourceParams
from qkdstack.physics.records import AliceRecord, DetectionRecord, Frame
from qkdstack.protocol import amplification, cascade, estimation, ldpc, public_random, sifting, verification
from qkdstack.protocol.channel import RECEIVED, SENT, Channel, Message, channel_pair
from qkdstack.protocol.estimation import Estimate, EstimationPolicy
from qkdstack.protocol.keyblock import Abort, KeyBlock, RoundOutcome
from qkdstack.theory.finite import lim2014_secret_length

LEAKING_STAGES = ("cascade", "verification")
"""The leaking stages of a Cascade round; an LDPC round has ("ldpc", "verification") (:func:`leaking_stages`)."""

RECONCILIATIONS = ("cascade", "ldpc")

LEAKAGE_RULE = "all-disclosed-both-directions"
"""λ = every disclosed bit of the leaking stages, Alice → Bob and Bob → Alice (valid against general attacks)."""

ALICE_TO_BOB = "alice_to_bob"
BOB_TO_ALICE = "bob_to_alice"


@dataclass(frozen=True)
class RoundConfig:
    """Everything both parties must agree on before a round (checked at ``round.start``)."""

    policy: EstimationPolicy
    cascade_schedule: str = "batched"
    min_qber_estimate: float = 0.005
    """Floor of the QBER estimate handed to Cascade (a zero estimate would make blocks unbounded)."""
    reconciliation: str = "cascade"
    """``cascade`` (interactive, :mod:`cascade`) or ``ldpc`` (syndrome + blind rounds, :mod:`ldpc`)."""
    ldpc: ldpc.LdpcParams = field(default_factory=ldpc.LdpcParams)

    def __post_init__(self) -> None:
        if self.reconciliation not in RECONCILIATIONS:
            raise ConfigError(f"[protocol] reconciliation must be \"cascade\" or \"ldpc\", got {self.reconciliation!r}")

    @classmethod
    def for_source(cls, source: SourceParams, **kwargs: Any) -> RoundConfig:
        """A config whose public decoy parameters are those of ``source``; kwargs go to the policy or here."""
        own = {k: kwargs.pop(k) for k in ("cascade_schedule", "min_qber_estimate", "reconciliation", "ldpc")
               if k in kwargs}
        policy = EstimationPolicy(source.intensities, source.intensity_probs, **kwargs)
        return cls(policy, **own)

    def public_parameters(self) -> dict[str, Any]:
        params: dict[str, Any] = asdict(self.policy)
        params["intensities"] = list(params["intensities"])
        params["intensity_probs"] = list(params["intensity_probs"])
        params["cascade_schedule"] = self.cascade_schedule
        params["min_qber_estimate"] = self.min_qber_estimate
        params["reconciliation"] = self.reconciliation
        if self.reconciliation == "ldpc":
            params["ldpc"] = self.ldpc.public()
        return params

    @property
    def leaking_stages(self) -> tuple[str, str]:
        """The stages whose disclosed bits make up λ: the reconciliation stage and verification."""
        return (self.reconciliation, "verification")


@dataclass
class _Timer:
    seconds: dict[str, float] = field(default_factory=dict)

    @contextmanager
    def stage(self, name: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start


def _disclosed(channel: Channel, role: str, stages: tuple[str, ...] = LEAKING_STAGES) -> dict[str, dict[str, int]]:
    """Disclosed bits so far per leaking stage and direction, named by role so both ends agree."""
    mine, theirs = (ALICE_TO_BOB, BOB_TO_ALICE) if role == "alice" else (BOB_TO_ALICE, ALICE_TO_BOB)
    stats = channel.stats
    return {
        stage: {mine: stats.disclosed_bits(stage, SENT), theirs: stats.disclosed_bits(stage, RECEIVED)}
        for stage in stages
    }


def _accounting(before: dict[str, dict[str, int]], after: dict[str, dict[str, int]]) -> dict[str, Any]:
    """The leakage of this round per stage and direction, and the rule that sums it into λ."""
    stages = {s: {d: after[s][d] - before[s][d] for d in (ALICE_TO_BOB, BOB_TO_ALICE)} for s in before}
    return {
        "rule": LEAKAGE_RULE,
        "stages": stages,
        "lambda_bits": sum(sum(by_dir.values()) for by_dir in stages.values()),
    }


def _qber_hint(estimate: Estimate, config: RoundConfig) -> float:
    """The Cascade QBER estimate: the test-basis QBER, which both parties know, floored."""
    return max(estimate.qber_test, config.min_qber_estimate)


async def _guarded(
    channel: Channel, block_id: str, timer: _Timer, body: Callable[[], Awaitable[KeyBlock]]
) -> RoundOutcome:
    """Run a party's round body; turn failures into an Abort and tell the peer."""
    try:
        return await body()
    except PeerAbort as exc:
        return Abort(block_id, exc.stage, exc.reason, dict(timer.seconds))
    except ProtocolAbort as exc:
        await channel.send_abort(exc.stage, exc.reason, block_id)
        return Abort(block_id, exc.stage, exc.reason, dict(timer.seconds))
    except (ChannelError, ValueError) as exc:
        reason = f"{type(exc).__name__}: {exc}"
        await channel.send_abort("round", reason, block_id)
        return Abort(block_id, "round", reason, dict(timer.seconds))


async def recv_fresh(channel: Channel, kind: str, block_id: str | None = None) -> Message:
    """Receive ``kind``, skipping abort notices that belong to an earlier round than ``block_id``."""
    while True:
        try:
            return await channel.recv(expect=kind)
        except PeerAbort as exc:
            if block_id is not None and exc.block_id == block_id:
                raise


def _final_length(estimate: Estimate, leakage: int, config: RoundConfig):
    """Lim 2014 Eq. (1) with λ = ``leakage``, every disclosed bit of the leaking stages."""
    policy = config.policy
    result = lim2014_secret_length(estimate.counts, leakage, policy.eps_sec, policy.eps_cor)
    if result.length <= 0:
        raise ProtocolAbort(
            "amplification",
            f"no secret key left: the finite-key length is {result.length} bits after {leakage} disclosed bits",
        )
    return result


def _key_block(
    block_id: str,
    key,
    estimate: Estimate,
    key_errors: int,
    accounting: dict[str, Any],
    finite,
    config: RoundConfig,
    timer: _Timer,
    stats: dict[str, Any],
) -> KeyBlock:
    n_key = sum(estimate.counts.key_counts)
    return KeyBlock(
        block_id=block_id,
        key=key,
        eps_sec=config.policy.eps_sec,
        eps_cor=config.policy.eps_cor,
        bound="lim2014",
        counts=estimate.to_dict(),
        qber_key=key_errors / n_key if n_key else 0.0,
        qber_test=estimate.qber_test,
        leakage_bits={stage: sum(by_dir.values()) for stage, by_dir in accounting["stages"].items()},
        finite_key=finite.to_dict(),
        stage_seconds=dict(timer.seconds),
        stats=stats,
        leakage_accounting=accounting,
    )


def _check_key_qber(errors: int, n_key: int, config: RoundConfig) -> None:
    qber = errors / n_key if n_key else 0.0
    if qber > config.policy.max_qber:
        raise ProtocolAbort(
            config.reconciliation,
            f"QBER {100 * qber:.2f}% in the key basis exceeds the tolerance {100 * config.policy.max_qber:.2f}%",
        )


def key_error_bits(n_key: int) -> int:
    """Width of the key-error count for ``n_key`` sifted bits: ⌈log2(n_key + 1)⌉ (at least 1)."""
    return max(1, int(n_key).bit_length())


async def _exchange_key_errors(channel: Channel, role: str, sifted_bits: np.ndarray, corrected: np.ndarray) -> int:
    """Bob counts the errors Cascade corrected and announces the count as disclosed bits.

    The count depends on the keys, so it travels as ``disclosed`` bits (fixed width
    :func:`key_error_bits`, MSB first) and the channel counts it as leakage. (The positions
    Cascade flipped already follow from the Cascade transcript, so this is conservative.)
    """
    width = key_error_bits(sifted_bits.size)
    if role == "alice":
        bits = (await channel.recv(expect="verification.key_errors")).disclosed
        if bits is None or len(bits) != width:
            raise ProtocolAbort("verification", f"the key-error count must be {width} disclosed bits")
        errors = int("".join(map(str, bits.to_bits())), 2)
        if errors > sifted_bits.size:
            raise ProtocolAbort("verification", "the key-error count exceeds the key length")
        return errors
    errors = int(np.count_nonzero(corrected != sifted_bits))
    count = BitArray.from_bits([(errors >> (width - 1 - i)) & 1 for i in range(width)])
    await channel.send("verification.key_errors", disclosed=count)
    return errors


async def _distill(
    channel: Channel, record: AliceRecord | DetectionRecord, config: RoundConfig, role: str, block_id: str,
    timer: _Timer, before: dict[str, dict[str, int]],
) -> KeyBlock:
    """The stages of a round for ``role`` ("alice" or "bob"): each stage module's function of that name."""
    policy = config.policy
    with timer.stage("sifting"):
        sifted = await getattr(sifting, role)(channel, record)
    with timer.stage("estimation"):
        estimate = await getattr(estimation, role)(channel, sifted, policy)
    with timer.stage(config.reconciliation):
        if config.reconciliation == "ldpc":
            corrected = await getattr(ldpc, role)(channel, sifted.key_bits, _qber_hint(estimate, config),
                                                  config.ldpc)
        else:
            corrected = await getattr(cascade, role)(channel, sifted.key_bits, _qber_hint(estimate, config),
                                                     config.cascade_schedule)
    with timer.stage("verification"):
        await getattr(verification, role)(channel, corrected.key, policy.eps_cor)
        key_errors = await _exchange_key_errors(channel, role, sifted.key_bits, corrected.key)
        _check_key_qber(key_errors, sifted.key_bits.size, config)
    accounting = _accounting(before, _disclosed(channel, role, config.leaking_stages))
    with timer.stage("amplification"):
        finite = _final_length(estimate, accounting["lambda_bits"], config)
        amplified = await getattr(amplification, role)(channel, corrected.key, finite.length)
    stats: dict[str, Any] = {"detections": sifted.detections, "reconciliation": config.reconciliation}
    if public_random.is_seeded():  # qkdstack distill --reproducible: say it in the block's proof
        stats["public_randomness"] = public_random.SEEDED_LABEL
    if config.reconciliation == "ldpc":
        n_key = sifted.key_bits.size
        h = ldpc.binary_entropy(key_errors / n_key) if n_key else 0.0
        stats.update({
            "ldpc_round_trips": corrected.round_trips, "ldpc_code": corrected.code,
            "ldpc_codewords": corrected.codewords, "ldpc_failed_first": corrected.failed_first,
            "ldpc_blind_rounds": corrected.blind_rounds, "ldpc_syndrome_bits": corrected.syndrome_bits,
            "ldpc_revealed_bits": corrected.revealed_bits, "ldpc_status_bits": corrected.status_bits,
            # f counts everything the LDPC stage disclosed, both directions, against n·h(key QBER).
            "ldpc_efficiency": corrected.leaked_bits / (n_key * h) if h > 0 else None,
        })
    else:
        stats.update({"cascade_round_trips": corrected.round_trips, "cascade_passes": corrected.passes})
    return _key_block(block_id, amplified.key, estimate, key_errors, accounting, finite, config, timer, stats)


async def alice(channel: Channel, record: AliceRecord, config: RoundConfig) -> RoundOutcome:
    """Alice's half of a round: she opens it with a fresh block ID and the public parameters."""
    block_id = public_random.block_id()  # the OS CSPRNG (or the reproducible mode's stream)
    timer = _Timer()
    before = _disclosed(channel, "alice", config.leaking_stages)

    async def body() -> KeyBlock:
        await channel.send("round.start", block_id=block_id, parameters=config.public_parameters())
        await recv_fresh(channel, "round.ready", block_id)
        return await _distill(channel, record, config, "alice", block_id, timer, before)

    return await _guarded(channel, block_id, timer, body)


async def bob(channel: Channel, record: DetectionRecord, config: RoundConfig) -> RoundOutcome:
    """Bob's half of a round: he checks Alice's public parameters against his own configuration."""
    timer = _Timer()
    before = _disclosed(channel, "bob", config.leaking_stages)
    start = await recv_fresh(channel, "round.start")
    block_id = str(start["block_id"])

    async def body() -> KeyBlock:
        theirs = start["parameters"]
        for name, value in config.public_parameters().items():
            if theirs.get(name) != value:
                raise ProtocolAbort("round", f"configuration mismatch: Alice has {name}={theirs.get(name)!r}, "
                                             f"Bob has {value!r}")
        await channel.send("round.ready", block_id=block_id)
        return await _distill(channel, record, config, "bob", block_id, timer, before)

    return await _guarded(channel, block_id, timer, body)


async def run_in_memory(frame: Frame, config: RoundConfig) -> tuple[RoundOutcome, RoundOutcome]:
    """Run both halves of a round over an in-memory channel pair: (Alice's outcome, Bob's)."""
    if frame.alice.n_pulses != frame.bob.n_pulses:
        raise ConfigError("frame records disagree on the number of pulses")
    a_chan, b_chan = channel_pair()
    return tuple(await asyncio.gather(alice(a_chan, frame.alice, config), bob(b_chan, frame.bob, config)))
