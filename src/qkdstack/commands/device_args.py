"""Command-line flags that describe a decoy-state BB84 device, shared by every command.

``qkdstack simulate`` and ``qkdstack keyrate`` (and any later command that needs a device
model) call :func:`add_device_arguments` on their parser and
:func:`device_params_from_args` on the parsed namespace, so that the same flag means the
same thing everywhere:

==========================  ==========================================================  ==========
flag                        meaning                                                     default
==========================  ==========================================================  ==========
``--distance-km``           fibre length in km: a value, a comma list, or START:STOP:STEP  25
``--attenuation``           fibre attenuation in dB/km                                  0.2
``--extra-loss``            fixed extra loss in dB (connectors, receiver optics)        0
``--detector-efficiency``   η_Bob: receiver transmittance including detector efficiency 0.1
``--dark-count``            background yield Y0: probability that Bob's detection       1e-6
                            system (two detectors) clicks on an empty pulse
``--misalignment``          e_mis (e_d): probability a photon in the matching basis     0.01
                            lands in the wrong detector
``--afterpulse``            after-pulse probability p_ap per click                      0
``--dead-time``             detector dead time in seconds                               0
``--mu``                    signal intensity μ1 (mean photon number)                    0.5
``--decoys``                decoy intensities μ2,μ3 (comma list; empty for none)        0.25,0.0
``--intensity-probs``       probabilities of μ1,μ2,μ3 (comma list summing to 1)         see below
``--basis-prob-z``          probability of the key basis Z (Alice, and Bob unless       0.8
                            ``--receiver-basis-prob-z`` is given); 0.5 = symmetric BB84
``--receiver-basis-prob-z`` Bob's key-basis probability if it differs from Alice's      same
``--rep-rate``              source repetition rate in Hz                                1e9
==========================  ==========================================================  ==========

Without ``--intensity-probs`` the probabilities are those of :class:`SourceParams` for three
intensities (0.4, 0.4, 0.2: near the Lim 2014 finite-key optimum), 0.6/0.4 for two, and 1 for a
lone signal. Values that do not parse exit with argparse's
one-line message (exit 2); values that parse but make no physical sense (negative length,
intensities out of order, probabilities that do not sum to 1) raise
:class:`~qkdstack.errors.ConfigError` from :mod:`qkdstack.physics.params`, which the CLI
turns into one sentence and exit code 2.
"""

from __future__ import annotations

import argparse
import math

from qkdstack.errors import ConfigError
from qkdstack.physics.params import ChannelParams, DeviceParams, ReceiverParams, SourceParams

DEFAULT_SOURCE = SourceParams()
DEFAULT_RECEIVER = ReceiverParams()


def _float(text: str) -> float:
    """One finite float; argparse reports a ValueError/ArgumentTypeError as a one-line error."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


parse_float = _float
"""Public name of the finite-float argparse type (``_float`` stays for existing importers)."""


def parse_float_list(text: str) -> tuple[float, ...]:
    """A comma-separated list of finite floats; an empty string (or ``none``) is the empty list."""
    text = text.strip()
    if text == "" or text.lower() == "none":
        return ()
    return tuple(_float(part.strip()) for part in text.split(","))


def parse_distances(text: str) -> tuple[float, ...]:
    """Distances in km from ``25``, ``10,50,100`` or ``START:STOP:STEP`` (STOP included when on the grid)."""
    text = text.strip()
    if ":" in text:
        parts = text.split(":")
        if len(parts) != 3:
            raise argparse.ArgumentTypeError(f"{text!r} is not START:STOP:STEP")
        start, stop, step = (_float(p) for p in parts)
        if step <= 0:
            raise argparse.ArgumentTypeError(f"the step of {text!r} must be > 0")
        if stop < start:
            raise argparse.ArgumentTypeError(f"the stop of {text!r} must not be below its start")
        count = math.floor((stop - start) / step + 1e-9) + 1
        if count > 100_000:
            raise argparse.ArgumentTypeError(f"{text!r} gives more than 100000 distances")
        return tuple(round(start + i * step, 12) for i in range(count))
    values = parse_float_list(text)
    if not values:
        raise argparse.ArgumentTypeError("expected at least one distance")
    return values


def add_device_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the device-model flags (see the module docstring) to ``parser``, in a group of their own."""
    g = parser.add_argument_group("device model")
    g.add_argument(
        "--distance-km",
        type=parse_distances,
        default=(25.0,),
        metavar="KM",
        help="fibre length in km: a value, a comma list, or START:STOP:STEP (default 25)",
    )
    g.add_argument("--attenuation", type=_float, default=0.2, metavar="DB_PER_KM", help="fibre loss (default 0.2)")
    g.add_argument("--extra-loss", type=_float, default=0.0, metavar="DB", help="fixed extra loss in dB (default 0)")
    g.add_argument(
        "--detector-efficiency",
        type=_float,
        default=0.1,
        metavar="ETA_BOB",
        help="Bob's total transmittance including detector efficiency (default 0.1)",
    )
    g.add_argument(
        "--dark-count",
        type=_float,
        default=1e-6,
        metavar="Y0",
        help="background yield: probability Bob's detectors click on an empty pulse (default 1e-6)",
    )
    g.add_argument(
        "--misalignment", type=_float, default=0.01, metavar="E_D", help="misalignment error e_d (default 0.01)"
    )
    g.add_argument(
        "--afterpulse", type=_float, default=0.0, metavar="P_AP", help="after-pulse probability per click (default 0)"
    )
    g.add_argument(
        "--dead-time", type=_float, default=0.0, metavar="SECONDS", help="detector dead time in s (default 0)"
    )
    g.add_argument(
        "--mu", type=_float, default=DEFAULT_SOURCE.intensities[0],
        help="signal intensity μ1, mean photons per pulse (default 0.5)",
    )
    g.add_argument(
        "--decoys",
        type=parse_float_list,
        default=DEFAULT_SOURCE.intensities[1:],
        metavar="MU2,MU3",
        help="decoy intensities, comma list, decreasing; empty for none (default 0.25,0.0)",
    )
    g.add_argument(
        "--intensity-probs",
        type=parse_float_list,
        default=None,
        metavar="P1,P2,P3",
        help="probabilities of signal and decoys, summing to 1 (default 0.4,0.4,0.2)",
    )
    g.add_argument(
        "--basis-prob-z",
        type=_float,
        default=DEFAULT_SOURCE.p_z,
        metavar="P_Z",
        help="probability of the key basis Z at Alice and Bob; 0.5 = symmetric BB84 (default 0.8)",
    )
    g.add_argument(
        "--receiver-basis-prob-z",
        type=_float,
        default=None,
        metavar="P_Z",
        help="Bob's key-basis probability if it differs from Alice's (default: same as --basis-prob-z)",
    )
    g.add_argument("--rep-rate", type=_float, default=1e9, metavar="HZ", help="source repetition rate (default 1e9)")


def pulse_count(text: str) -> int:
    """An integer number of pulses; accepts 1e9-style notation when it is a whole number.

    The range is the device's own check (:func:`qkdstack.physics.device.check_pulses`), applied while the
    command line is parsed.
    """
    try:
        n = int(text)
    except ValueError:
        try:
            f = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number of pulses") from None
        if not math.isfinite(f) or f != math.floor(f):
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of pulses") from None
        n = int(f)
    from qkdstack.physics.device import check_pulses

    try:
        return check_pulses(n)
    except ConfigError:
        raise argparse.ArgumentTypeError(f"must be a whole number of pulses in 1..2^62-1, got {text!r}") from None


def seed_value(text: str) -> int:
    """A simulation seed: a whole number ≥ 0 (what ``numpy.random.default_rng`` accepts)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"a seed must be ≥ 0, got {value}")
    return value


def add_frame_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of a simulated frame: ``--pulses``, ``--eve``, ``--seed`` (simulate, distill)."""
    g = parser.add_argument_group("frame")
    g.add_argument("--pulses", type=pulse_count, default=None,
                   help="pulses per frame (default: simulate 1e8; distill follows the distance, at least 0.4 s of "
                   "device time, as qkdstack init)")
    g.add_argument("--eve", default="none", metavar="ATTACK",
                   help="none | intercept-resend:FRACTION | pns | beamsplit:FRACTION (default none)")
    g.add_argument("--seed", type=seed_value, default=None, help="seed of the simulation, ≥ 0 (default: fresh)")


def default_intensity_probs(n_intensities: int) -> tuple[float, ...]:
    """SourceParams' probabilities for three intensities, 0.6/0.4 for two, 1 for a lone signal."""
    if n_intensities == len(DEFAULT_SOURCE.intensity_probs):
        return DEFAULT_SOURCE.intensity_probs
    return {1: (1.0,), 2: (0.6, 0.4)}[n_intensities]


def device_params_from_args(args: argparse.Namespace, distance_km: float | None = None) -> DeviceParams:
    """Build (and validate) the :class:`DeviceParams` the flags describe.

    ``distance_km`` overrides ``--distance-km`` (commands that sweep distances call this
    once per distance); without it ``--distance-km`` must name exactly one distance.
    Raises :class:`ConfigError` naming the flag or field on bad values.
    """
    if distance_km is None:
        distances = tuple(args.distance_km)
        if len(distances) != 1:
            raise ConfigError(f"--distance-km must name one distance for this command, got {len(distances)}")
        distance_km = distances[0]
    intensities = (float(args.mu), *(float(d) for d in args.decoys))
    probs = args.intensity_probs if args.intensity_probs is not None else default_intensity_probs(len(intensities))
    if len(probs) != len(intensities):
        raise ConfigError(
            f"--intensity-probs must give {len(intensities)} probabilities (one for --mu and each decoy), "
            f"got {len(probs)}"
        )
    p_z = float(args.basis_prob_z)
    p_z_bob = p_z if args.receiver_basis_prob_z is None else float(args.receiver_basis_prob_z)
    try:
        return _build(args, distance_km, intensities, tuple(probs), p_z, p_z_bob)
    except ConfigError as exc:
        flag = _flag_for(str(exc))
        if flag is None:
            raise
        _name, sep, rest = str(exc).partition(" must ")  # one name per parameter: the flag's, not the physics'
        raise ConfigError(f"{flag} must {rest}" if sep else f"{flag}: {exc}") from None


# Field-name prefixes of the messages qkdstack.physics.params raises, and the flag that sets each field.
_FIELD_FLAGS: tuple[tuple[str, str], ...] = (
    ("rep_rate_hz", "--rep-rate"),
    ("intensities[0]", "--mu"),
    ("intensities", "--mu/--decoys"),
    ("intensity_probs", "--intensity-probs"),
    ("p_z (Alice", "--basis-prob-z"),
    ("receiver p_z", "--receiver-basis-prob-z"),
    ("length_km", "--distance-km"),
    ("attenuation_db_per_km", "--attenuation"),
    ("extra_loss_db", "--extra-loss"),
    ("misalignment", "--misalignment"),
    ("efficiency", "--detector-efficiency"),
    ("dark_count", "--dark-count"),
    ("afterpulse", "--afterpulse"),
    ("dead_time_s", "--dead-time"),
)


def _flag_for(message: str) -> str | None:
    for prefix, flag in _FIELD_FLAGS:
        if message.startswith(prefix):
            return flag
    return None


def _build(
    args: argparse.Namespace,
    distance_km: float,
    intensities: tuple[float, ...],
    probs: tuple[float, ...],
    p_z: float,
    p_z_bob: float,
) -> DeviceParams:
    source = SourceParams(
        rep_rate_hz=float(args.rep_rate),
        intensities=intensities,
        intensity_probs=probs,
        p_z=p_z,
    )
    channel = ChannelParams(
        length_km=float(distance_km),
        attenuation_db_per_km=float(args.attenuation),
        extra_loss_db=float(args.extra_loss),
        misalignment=float(args.misalignment),
    )
    receiver = ReceiverParams(
        p_z=p_z_bob,
        efficiency=float(args.detector_efficiency),
        dark_count=float(args.dark_count),
        afterpulse=float(args.afterpulse),
        dead_time_s=float(args.dead_time),
    )
    return DeviceParams(source=source, channel=channel, receiver=receiver)
