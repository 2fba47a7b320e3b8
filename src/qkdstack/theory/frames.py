"""How many pulses a round needs: frames that follow the distance.

A round's key comes from the finite-key bound of Lim et al., PRA 89, 022307 (2014), Eq. (1), whose
statistical corrections shrink with the block: a frame too small for the channel gives no key at all,
however clean the link (at 50 km a frame of 10^8 pulses carries about 1.9·10^5 key-basis detections,
and its phase-error bound exceeds the 20 % tolerance). :func:`frame_pulses` picks the frame from the
expected key of the device model (:func:`~qkdstack.theory.keyrate.lim2014_expected_rate`): the
smallest frame whose expected secret length is positive, times a safety margin for statistical
fluctuations, and never less than ``min_seconds`` of device time (per-round costs, such as the
authentication tags and the round trips of the two nodes, are then small beside the round's work:
two nodes keep up with a 1 GHz device at 25 km with 0.4 s frames, not with 0.1 s ones).

λ_EC is modelled as ``f_ec·n·h(e)`` with ``f_ec = 2.2`` by default: Cascade's f ≈ 1.07 counted in both
directions (Alice's parities and Bob's decision bits, docs/protocol.md), with a small margin.
"""

from __future__ import annotations

import math

from qkdstack.errors import ConfigError
from qkdstack.physics.params import DeviceParams
from qkdstack.theory.device import expected_sifted_counts
from qkdstack.theory.keyrate import lim2014_expected_rate

DEFAULT_F_EC = 2.2
"""λ_EC/(n h(e)) of a Cascade round counted in both directions (2 × 1.07, rounded up)."""
MIN_SECONDS = 0.4
"""Device time per round at the least (0.4 s: 4·10^8 pulses at 1 GHz)."""
MARGIN = 2.0
"""Frame = MARGIN × the smallest frame with a positive expected key."""
MAX_KEY_DETECTIONS = 3e7
"""Memory cap: key-basis detections per frame (about 1 GB of node memory beyond this)."""


def frame_pulses(
    params: DeviceParams,
    *,
    f_ec: float = DEFAULT_F_EC,
    eps_sec: float = 1e-10,
    eps_cor: float = 1e-15,
    min_seconds: float = MIN_SECONDS,
    margin: float = MARGIN,
) -> int:
    """Pulses per frame for ``params``: at least ``min_seconds`` of device time, and ``margin`` times the
    smallest frame whose expected Lim 2014 key is positive.

    Raises :class:`ConfigError` (one sentence) when no frame under the memory cap gives a key: the
    distance is beyond what this device can bridge with a finite key.
    """
    per_pulse = expected_sifted_counts(params, 1.0).key_total
    rate = params.source.rep_rate_hz
    floor = max(min_seconds * rate, 1e6)
    cap = MAX_KEY_DETECTIONS / per_pulse if per_pulse > 0 else 0.0
    n = 1e6
    while n <= cap:
        if lim2014_expected_rate(params, per_pulse * n, f_ec, eps_sec, eps_cor).length > 0:
            pulses = min(max(floor, margin * n), cap)
            return int(10 ** math.floor(math.log10(pulses)) * math.ceil(pulses / 10 ** math.floor(math.log10(pulses))))
        n *= 1.25
    raise ConfigError(
        f"no finite key is expected at {params.channel.length_km:g} km with this device: even "
        f"{MAX_KEY_DETECTIONS:.0e} key-basis detections per frame (the memory cap) give none; "
        "choose a shorter distance or a better detector"
    )
