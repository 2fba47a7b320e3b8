"""The results of a distillation round: a :class:`KeyBlock` with its proof, or an :class:`Abort`.

Every key carries its proof: the security parameters, the bound used, the counts it was
computed from and the bits disclosed. The key bits themselves never appear in a repr,
a log line or ``to_dict()``.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from qkdstack.bits import BitArray


@dataclass(frozen=True, repr=False)
class KeyBlock:
    """A distilled secret key, identical at both ends, and the evidence for its security."""

    block_id: str
    key: BitArray
    eps_sec: float
    eps_cor: float
    bound: str
    counts: dict[str, Any]
    qber_key: float
    qber_test: float
    leakage_bits: dict[str, int]
    finite_key: dict[str, Any]
    stage_seconds: dict[str, float] = field(default_factory=dict)
    stats: dict[str, Any] = field(default_factory=dict)
    leakage_accounting: dict[str, Any] = field(default_factory=dict)
    provenance: dict[str, Any] = field(default_factory=dict)
    """Added by the node once the round is authenticated (:meth:`with_provenance`): the device that made
    the key and its caveats, and the composed ε (ε_sec + ε_cor + the round's authentication error)."""
    """The rule λ_EC was counted by and the disclosed bits per stage and direction (round.py)."""

    @property
    def length(self) -> int:
        return len(self.key)

    def to_dict(self) -> dict[str, Any]:
        """Metadata only (no key bits), for reports and JSON output."""
        return {
            "block_id": self.block_id,
            "length_bits": self.length,
            "eps_sec": self.eps_sec,
            "eps_cor": self.eps_cor,
            "bound": self.bound,
            "counts": self.counts,
            "qber_key": self.qber_key,
            "qber_test": self.qber_test,
            "leakage_bits": self.leakage_bits,
            "leakage_accounting": self.leakage_accounting,
            "provenance": self.provenance,
            "finite_key": self.finite_key,
            "stage_seconds": self.stage_seconds,
            "stats": self.stats,
        }

    def with_provenance(self, **entries: Any) -> KeyBlock:
        """A copy whose proof also records ``entries`` (device labels, authentication, composed ε)."""
        return replace(self, provenance={**self.provenance, **entries})

    def __repr__(self) -> str:
        return f"KeyBlock(id={self.block_id}, {self.length} bits, eps_sec={self.eps_sec:g}, eps_cor={self.eps_cor:g})"


@dataclass(frozen=True)
class Abort:
    """A round that produced no key, and why (one sentence)."""

    block_id: str
    stage: str
    reason: str
    stage_seconds: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"block_id": self.block_id, "aborted": True, "stage": self.stage, "reason": self.reason}

    def __str__(self) -> str:
        return f"round {self.block_id} aborted in {self.stage}: {self.reason}"


RoundOutcome = KeyBlock | Abort
