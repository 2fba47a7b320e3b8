"""The Python API: ``qkdstack.simulate``, ``qkdstack.distill`` and ``qkdstack.keyrate`` for notebooks.

A small synchronous facade over the same code as the ``qkdstack`` command (docs/api.md). Each function
takes the command's flags as keyword arguments with the same names (``--distance-km`` is
``distance_km``, ``--basis-prob-z`` is ``basis_prob_z``, …), parses them with the command's own
parser, and calls the functions the command calls, so that the API and the CLI agree on every
default, every check and, for the same seed, every simulated frame. Each returns a list of plain
dicts, one per row, with scalar values (``keyrate``'s ``intensities`` and ``intensity_probs`` are
tuples), that go straight into ``pandas.DataFrame(rows)``.

``distance_km`` takes one length, a list of lengths or ``"START:STOP:STEP"`` in every function;
each row says its ``distance_km``. Bad values raise :class:`~qkdstack.errors.ConfigError` with one
sentence naming the parameter.

The functions work inside a running event loop (Jupyter's): a distillation round is a pair of
coroutines, which run with ``asyncio.run`` when no loop runs in the calling thread and otherwise
in a worker thread with a loop of its own (the call still blocks until the round is over).
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import importlib
import numbers
import re
from collections.abc import Coroutine, Iterable
from typing import Any, TypeVar

from qkdstack.commands.device_args import device_params_from_args
from qkdstack.commands.distill import distill_rounds, resolve_pulses, round_config
from qkdstack.commands.keyrate import _settings as keyrate_settings
from qkdstack.commands.keyrate import rate_rows
from qkdstack.commands.simulate import DEFAULT_PULSES, summarise
from qkdstack.errors import ConfigError
from qkdstack.physics.device import SimulatedDevice, check_pulses
from qkdstack.physics.eve import parse_eve
from qkdstack.physics.params import DeviceParams

__all__ = ["DISTILL_FIELDS", "KEYRATE_FIELDS", "SIMULATE_FIELDS", "distill", "keyrate", "run_coroutine", "simulate"]

SIMULATE_FIELDS: tuple[str, ...] = (
    "distance_km", "pulses", "seed", "eve",
    "class", "intensity", "basis", "pulses_expected", "detections", "errors",
    "gain", "gain_theory", "qber", "qber_theory",
)
"""Keys of each :func:`simulate` row (one row per distance, intensity class and sifted basis)."""

DISTILL_FIELDS: tuple[str, ...] = (
    "distance_km", "round", "pulses", "seed", "eve", "reconciliation",
    "aborted", "abort_stage", "abort_reason",
    "detections", "sifted_key_bits", "sifted_test_bits", "qber_z", "qber_x", "phase_error_bound",
    "reconciliation_efficiency", "reconciliation_round_trips", "leakage_bits_total",
    "key_bits", "eps_sec", "eps_cor", "secret_key_rate_bit_per_pulse", "secret_key_rate_bit_per_s",
    "simulation_seconds", "wall_seconds",
)
"""Keys of each :func:`distill` row (one row per distance and round)."""

KEYRATE_FIELDS: tuple[str, ...] = (
    "distance_km", "method", "block_size", "optimize", "ec_efficiency", "eps_sec", "eps_cor",
    "rate_per_pulse", "rate_bps", "qber", "eta_sys", "loss_db", "plob_per_pulse",
    "intensities", "intensity_probs", "basis_prob_z", "receiver_basis_prob_z",
    "pulses_per_block", "secret_bits_per_block",
)
"""Keys of each :func:`keyrate` row (one row per distance)."""

_T = TypeVar("_T")


# ------------------------------------------------------------------------------------------ arguments


class _RaisingParser(argparse.ArgumentParser):
    """The command's parser, raising ConfigError instead of printing and exiting."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise ConfigError(message)


_FLAG = re.compile(r"--([a-z][a-z0-9]*(?:-[a-z0-9]+)*)")


def _renamed(exc: ConfigError) -> ConfigError:
    """The same sentence with each ``--flag-name`` written as the parameter ``flag_name``."""
    message = str(exc).removeprefix("argument ")
    return ConfigError(_FLAG.sub(lambda m: m.group(1).replace("-", "_"), message))


def _text(name: str, value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, bool):  # a bool is an Integral, but no number a user means
        return repr(value)
    if isinstance(value, numbers.Integral):
        return str(int(value))
    if isinstance(value, numbers.Real):
        return repr(float(value))
    if isinstance(value, Iterable):
        return ",".join(_text(name, v) for v in value)
    raise ConfigError(f"{name} must be a number, a list of numbers or a string, got {value!r}")


def _namespace(command: str, values: dict[str, Any], switches: tuple[str, ...] = ()) -> argparse.Namespace:
    """Parse ``values`` (parameter name → value) with the ``qkdstack COMMAND`` parser.

    ``None`` leaves a flag at its default; ``switches`` are on/off flags that take True or False.
    """
    parser = _RaisingParser(prog="qkdstack")
    sub = parser.add_subparsers(dest="command", parser_class=_RaisingParser)
    importlib.import_module(f"qkdstack.commands.{command}").register(sub)
    argv = [command]
    for name, value in values.items():
        flag = "--" + name.replace("_", "-")
        if name in switches:
            if not isinstance(value, bool):
                raise ConfigError(f"{name} must be True or False, got {value!r}")
            argv += [flag] if value else []
        elif value is not None:
            argv.append(f"{flag}={_text(name, value)}")
    try:
        return parser.parse_args(argv)
    except ConfigError as exc:
        raise _renamed(exc) from None


def _device_params(args: argparse.Namespace, distance_km: float) -> DeviceParams:
    try:
        return device_params_from_args(args, distance_km=distance_km)
    except ConfigError as exc:
        raise _renamed(exc) from None


def _checked(call: Any, *a: Any, **kw: Any) -> Any:
    try:
        return call(*a, **kw)
    except ConfigError as exc:
        raise _renamed(exc) from None


# ---------------------------------------------------------------------------------------- event loops


def run_coroutine(coro: Coroutine[Any, Any, _T]) -> _T:
    """Run ``coro`` to completion from synchronous code, also inside a running event loop.

    Without a running loop in this thread: ``asyncio.run``. With one (Jupyter's kernel runs one, and
    ``asyncio.run`` refuses to nest): ``asyncio.run`` in a worker thread, whose result (or exception)
    comes back here; this thread waits for it.
    """
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="qkdstack-api") as pool:
        return pool.submit(asyncio.run, coro).result()


# ----------------------------------------------------------------------------------------------- API


def simulate(
    distance_km: float | Iterable[float] | str = 25.0,
    *,
    pulses: int | float | None = None,
    eve: str = "none",
    seed: int | None = None,
    afterpulse_mode: str = "same-class",
    attenuation: float = 0.2,
    extra_loss: float = 0.0,
    detector_efficiency: float = 0.1,
    dark_count: float = 1e-6,
    misalignment: float = 0.01,
    afterpulse: float = 0.0,
    dead_time: float = 0.0,
    mu: float = 0.5,
    decoys: Iterable[float] = (0.25, 0.0),
    intensity_probs: Iterable[float] | None = None,
    basis_prob_z: float = 0.8,
    receiver_basis_prob_z: float | None = None,
    rep_rate: float = 1e9,
) -> list[dict[str, Any]]:
    """Simulate one frame of the device per distance, as ``qkdstack simulate``; rows per class and basis.

    Each row (keys :data:`SIMULATE_FIELDS`) gives a (intensity class, sifted basis) cell: detections,
    errors, measured gain and QBER beside the model's (Lim et al., PRA 89, 022307 (2014)). ``pulses``
    defaults to 10^8 per frame; ``seed`` (≥ 0) makes each distance's frame the one
    ``qkdstack simulate --distance-km D --seed S`` simulates. See docs/api.md for every parameter.
    """
    args = _namespace("simulate", dict(locals()))
    eve_model = _checked(parse_eve, args.eve, flag="eve")
    n = check_pulses(DEFAULT_PULSES if args.pulses is None else args.pulses)
    all_params = [_device_params(args, d) for d in args.distance_km]  # every distance checked first
    rows: list[dict[str, Any]] = []
    for d, params in zip(args.distance_km, all_params, strict=True):
        device = SimulatedDevice(params, eve_model, seed=args.seed, afterpulse_mode=args.afterpulse_mode)
        frame = device.run_frame(n)
        for cell in summarise(frame, params):
            rows.append({"distance_km": d, "pulses": n, "seed": args.seed, "eve": str(eve_model), **cell})
    return rows


def distill(
    distance_km: float | Iterable[float] | str = 25.0,
    *,
    pulses: int | float | None = None,
    rounds: int = 1,
    eve: str = "none",
    seed: int | None = None,
    eps_sec: float = 1e-10,
    eps_cor: float = 1e-15,
    max_qber: float = 0.11,
    max_phase_error: float = 0.2,
    cascade_schedule: str = "batched",
    reconciliation: str = "cascade",
    reproducible: int | None = None,
    attenuation: float = 0.2,
    extra_loss: float = 0.0,
    detector_efficiency: float = 0.1,
    dark_count: float = 1e-6,
    misalignment: float = 0.01,
    afterpulse: float = 0.0,
    dead_time: float = 0.0,
    mu: float = 0.5,
    decoys: Iterable[float] = (0.25, 0.0),
    intensity_probs: Iterable[float] | None = None,
    basis_prob_z: float = 0.8,
    receiver_basis_prob_z: float | None = None,
    rep_rate: float = 1e9,
) -> list[dict[str, Any]]:
    """Simulate and distill ``rounds`` frames per distance, as ``qkdstack distill``; one row per round.

    Each row (keys :data:`DISTILL_FIELDS`) says whether the round aborted (and where and why) or gives
    its sifted bits, QBER, phase-error bound, reconciliation efficiency, disclosed bits λ and secret key
    bits. ``pulses`` defaults to a frame that follows the distance (as ``qkdstack init`` picks it).
    ``seed`` reproduces the simulated frames (the post-processing's hash seeds come from the OS, so key
    lengths vary by about 1–2 % between runs); ``reproducible=SEED`` seeds those too, so that a run repeats
    bit for bit (experiments only: such keys are predictable and not secret). Works inside Jupyter's
    running event loop.
    """
    args = _namespace("distill", dict(locals()))
    eve_model = _checked(parse_eve, args.eve, flag="eve")
    plans = []
    for d in args.distance_km:  # every distance checked before any frame is simulated
        params = _device_params(args, d)
        plans.append((d, params, _checked(round_config, args, params), _checked(resolve_pulses, params, args.pulses)))
    rows: list[dict[str, Any]] = []
    for d, params, config, n in plans:
        reports = distill_rounds(params, config, pulses=n, rounds=args.rounds, eve=eve_model, seed=args.seed,
                                 run_async=run_coroutine, reproducible=args.reproducible)
        for i, report in enumerate(reports, start=1):
            rows.append(_distill_row(report, d, i, n, args, str(eve_model)))
    return rows


def _distill_row(report: dict[str, Any], distance_km: float, index: int, pulses: int,
                 args: argparse.Namespace, eve: str) -> dict[str, Any]:
    aborted = bool(report["aborted"])
    row: dict[str, Any] = {
        "distance_km": distance_km, "round": index, "pulses": pulses, "seed": args.seed, "eve": eve,
        "reconciliation": args.reconciliation, "aborted": aborted,
        "abort_stage": report.get("stage") if aborted else None,
        "abort_reason": report.get("reason") if aborted else None,
    }
    for key in ("detections", "sifted_key_bits", "sifted_test_bits", "qber_z", "qber_x", "phase_error_bound",
                "reconciliation_efficiency", "reconciliation_round_trips"):
        row[key] = report.get(key)
    row["leakage_bits_total"] = None if aborted else int(sum(report["leakage_bits"].values()))
    row["key_bits"] = 0 if aborted else report["key_bits"]
    row["eps_sec"] = args.eps_sec
    row["eps_cor"] = args.eps_cor
    row["secret_key_rate_bit_per_pulse"] = 0.0 if aborted else report["secret_key_rate_bit_per_pulse"]
    row["secret_key_rate_bit_per_s"] = 0.0 if aborted else report["secret_key_rate_bit_per_s"]
    row["simulation_seconds"] = report["simulation_seconds"]
    row["wall_seconds"] = report["wall_seconds"]
    return row


def keyrate(
    distance_km: float | Iterable[float] | str = 25.0,
    *,
    block_size: float | None = None,
    decoy_method: str | None = None,
    optimize: bool = False,
    ec_efficiency: float = 1.16,
    eps_sec: float = 1e-10,
    eps_cor: float = 1e-15,
    attenuation: float = 0.2,
    extra_loss: float = 0.0,
    detector_efficiency: float = 0.1,
    dark_count: float = 1e-6,
    misalignment: float = 0.01,
    afterpulse: float = 0.0,
    dead_time: float = 0.0,
    mu: float = 0.5,
    decoys: Iterable[float] = (0.25, 0.0),
    intensity_probs: Iterable[float] | None = None,
    basis_prob_z: float = 0.8,
    receiver_basis_prob_z: float | None = None,
    rep_rate: float = 1e9,
) -> list[dict[str, Any]]:
    """Expected secret-key rate per distance, as ``qkdstack keyrate``; one row per distance.

    ``decoy_method``: ``infinite`` or ``vacuum-weak`` (asymptotic, Ma et al., PRA 72, 012326 (2005),
    Eq. (1)) or ``lim2014`` (finite key, Lim et al., PRA 89, 022307 (2014), Eqs. (1)–(5), for a block
    of ``block_size`` key-basis detections n_X); default lim2014 with a block size, else infinite.
    Each row (keys :data:`KEYRATE_FIELDS`) also carries the PLOB bound of the fibre.
    """
    args = _namespace("keyrate", dict(locals()), switches=("optimize",))
    settings = _checked(keyrate_settings, args)
    rows = []
    for r in _checked(rate_rows, args, settings):
        rows.append({
            "distance_km": r["distance_km"], "method": r["method"], "block_size": r["block_size"],
            "optimize": bool(settings["optimize"]), "ec_efficiency": settings["f_ec"],
            "eps_sec": settings["eps_sec"], "eps_cor": settings["eps_cor"],
            "rate_per_pulse": r["rate_per_pulse"], "rate_bps": r["rate_bps"], "qber": r["qber"],
            "eta_sys": r["eta_sys"], "loss_db": r["loss_db"], "plob_per_pulse": r["plob_per_pulse"],
            "intensities": tuple(r["intensities"]), "intensity_probs": tuple(r["intensity_probs"]),
            "basis_prob_z": r["p_z"], "receiver_basis_prob_z": r["p_z_bob"],
            "pulses_per_block": r["pulses_per_block"], "secret_bits_per_block": r["secret_bits_per_block"],
        })
    return rows
