"""``qkdstack distill``: simulate frames and distill keys from them in memory.

Each round simulates one frame of the device (same flags as ``qkdstack simulate``) and
runs the whole post-processing over an in-memory channel: sifting, parameter
estimation, reconciliation (Cascade, or LDPC with ``--reconciliation ldpc``), verification
and privacy amplification. It prints what an operator checks: sifted bits, QBER in both
bases, the reconciliation efficiency f and round trips (Cascade: f = Alice's parities /
(n·h(QBER)), the usual figure, comparable with the literature; LDPC: f = *everything* the
LDPC stage disclosed, both directions, / (n·h(QBER)), with the frame's codeword outcomes),
the leakage λ subtracted (every disclosed bit, both directions), the verification result,
the final key length with ε_sec and ε_cor, the secret key rate (bit/pulse and bit/s at the
source's repetition rate) and the time per stage. ``--plot FILE.png`` draws the QBER and the
secret key of every round (:func:`qkdstack.plots.distill_figure`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import Callable, Coroutine, Iterator
from typing import Any

from qkdstack.commands.device_args import (
    add_device_arguments,
    add_frame_arguments,
    device_params_from_args,
    seed_value,
)
from qkdstack.commands.validate import plot_file, protocol_value
from qkdstack.errors import ConfigError
from qkdstack.physics.device import SimulatedDevice, check_pulses
from qkdstack.physics.eve import Eavesdropper, parse_eve
from qkdstack.physics.params import DeviceParams
from qkdstack.protocol import public_random
from qkdstack.protocol.cascade import SCHEDULES
from qkdstack.protocol.keyblock import Abort, KeyBlock
from qkdstack.protocol.round import RoundConfig, run_in_memory
from qkdstack.theory.entropy import binary_entropy
from qkdstack.theory.frames import frame_pulses


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``distill`` sub-command."""
    parser = subparsers.add_parser(
        "distill",
        help="simulate frames and distill secret keys from them (in memory)",
        description="Simulate frames of the decoy-state BB84 device and run the complete post-processing on "
        "each: sifting, finite-key parameter estimation, Cascade, verification, privacy amplification.",
    )
    add_device_arguments(parser)
    add_frame_arguments(parser)
    # The round settings are checked as [protocol] fields are (commands/validate.py), when the line is parsed.
    parser.add_argument("--rounds", type=int, default=1,  # checked by round_config, before any frame
                        help="frames to distill one after another (default 1)")
    parser.add_argument("--eps-sec", type=protocol_value("--eps-sec", "eps_sec"), default=1e-10,
                        help="secrecy parameter ε_sec (default 1e-10)")
    parser.add_argument("--eps-cor", type=protocol_value("--eps-cor", "eps_cor"), default=1e-15,
                        help="correctness parameter ε_cor (default 1e-15)")
    parser.add_argument("--max-qber", type=protocol_value("--max-qber", "max_qber"), default=0.11,
                        help="abort above this QBER (default 0.11)")
    parser.add_argument("--max-phase-error", type=protocol_value("--max-phase-error", "max_phase_error"), default=0.2,
                        help="abort above this phase-error bound (default 0.2)")
    parser.add_argument("--cascade-schedule", choices=sorted(SCHEDULES), default="batched",
                        help="Cascade block-size schedule (default batched)")
    parser.add_argument("--reconciliation", choices=("cascade", "ldpc"), default="cascade",
                        help="error correction: interactive Cascade (default) or one-way LDPC with blind rounds")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--reproducible", type=seed_value, default=None, metavar="SEED",
                        help="experiments only: draw the post-processing's public randomness (block IDs, Cascade "
                        "and LDPC seeds, hash keys, Toeplitz seeds) from a stream seeded with SEED, so that with "
                        "--seed a run repeats bit for bit; its keys are predictable and NOT secret")
    parser.add_argument("--plot", type=plot_file, default=None, metavar="FILE.png",
                        help="save QBER and secret key per round; needs matplotlib: pip install 'qkdstack[plot]'")
    parser.set_defaults(func=run)


def _round_report(outcome: KeyBlock | Abort, pulses: int, rep_rate: float, wall_s: float) -> dict[str, Any]:
    if isinstance(outcome, Abort):
        return {**outcome.to_dict(), "stage_seconds": outcome.stage_seconds, "wall_seconds": wall_s}
    meta = outcome.to_dict()
    n_key = int(sum(meta["counts"]["key_counts"]))
    n_test = int(sum(meta["counts"]["test_counts"]))
    h = binary_entropy(outcome.qber_key) if outcome.qber_key > 0 else 0.0
    stats = meta["stats"]
    recon = stats.get("reconciliation", "cascade")
    if recon == "ldpc":
        f = stats["ldpc_efficiency"]
        round_trips = stats["ldpc_round_trips"]
        frames = {"codewords": stats["ldpc_codewords"], "failed_first_decoding": stats["ldpc_failed_first"],
                  "blind_rounds": stats["ldpc_blind_rounds"], "code": stats["ldpc_code"],
                  "syndrome_bits": stats["ldpc_syndrome_bits"], "revealed_bits": stats["ldpc_revealed_bits"],
                  "status_bits": stats["ldpc_status_bits"]}
    else:
        leak_ec = outcome.leakage_accounting["stages"]["cascade"]["alice_to_bob"]  # Alice's parities: the usual f
        f = leak_ec / (n_key * h) if h > 0 else None
        round_trips = stats["cascade_round_trips"]
        frames = None
    report = {
        "block_id": outcome.block_id,
        "aborted": False,
        "pulses": pulses,
        "detections": meta["stats"]["detections"],
        "sifted_key_bits": n_key,
        "sifted_test_bits": n_test,
        "qber_z": outcome.qber_key,
        "qber_x": outcome.qber_test,
        "phase_error_bound": meta["finite_key"]["phase_error"],
        "reconciliation": recon,
        "reconciliation_efficiency": f,
        "reconciliation_round_trips": round_trips,
        "leakage_bits": outcome.leakage_bits,
        "leakage_accounting": outcome.leakage_accounting,
        "verification": "passed",
        "key_bits": outcome.length,
        "eps_sec": outcome.eps_sec,
        "eps_cor": outcome.eps_cor,
        "secret_key_rate_bit_per_pulse": outcome.length / pulses,
        "secret_key_rate_bit_per_s": outcome.length / pulses * rep_rate,
        "stage_seconds": meta["stage_seconds"],
        "wall_seconds": wall_s,
        "finite_key": {k: v for k, v in meta["finite_key"].items() if k not in ("counts", "bounds")},
    }
    if recon == "cascade":  # the names of earlier releases, kept for scripts that read them
        report["cascade_efficiency"] = f
        report["cascade_round_trips"] = round_trips
    else:
        report["ldpc_frames"] = frames
    return report


def _print_round(r: dict[str, Any], out) -> None:
    if r["aborted"]:
        print(f"round {r['block_id'][:8]}  ABORTED in {r['stage']}: {r['reason']}", file=out)
        return
    f = r["reconciliation_efficiency"]
    name = "Cascade" if r["reconciliation"] == "cascade" else "LDPC"
    rows = [
        ("pulses", f"{r['pulses']:.3g}"),
        ("detections", f"{r['detections']}"),
        ("sifted bits (key Z / test X)", f"{r['sifted_key_bits']} / {r['sifted_test_bits']}"),
        ("QBER Z / X", f"{100 * r['qber_z']:.3f} % / {100 * r['qber_x']:.3f} %"),
        ("phase-error bound", f"{100 * r['phase_error_bound']:.2f} %"),
        (f"{name} efficiency f", "n/a (no errors)" if f is None else f"{f:.3f}"),
        (f"{name} round trips", f"{r['reconciliation_round_trips']}"),
        *([("LDPC codewords (failed first / blind rounds)",
            f"{r['ldpc_frames']['codewords']} ({r['ldpc_frames']['failed_first_decoding']} / "
            f"{r['ldpc_frames']['blind_rounds']})")] if r["reconciliation"] == "ldpc" else []),
        (f"disclosed bits ({name} / verification)",
         f"{r['leakage_bits'][r['reconciliation']]} / {r['leakage_bits']['verification']}"),
        ("verification", r["verification"]),
        ("secret key", f"{r['key_bits']} bits"),
        ("ε_sec / ε_cor", f"{r['eps_sec']:g} / {r['eps_cor']:g}"),
        ("secret key rate", f"{r['secret_key_rate_bit_per_pulse']:.3e} bit/pulse = "
                            f"{r['secret_key_rate_bit_per_s']:.4g} bit/s"),
        ("time per stage", ", ".join(f"{k} {1000 * v:.0f} ms" for k, v in r["stage_seconds"].items())),
    ]
    print(f"round {r['block_id'][:8]}", file=out)
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"  {key:<{width}}  {value}", file=out)


_ROW_HEADER = f"{'round':>5}  {'outcome':<9} {'QBER Z':>8} {'f':>6} {'disclosed':>10} {'key bits':>10}"


def _round_row(index: int, r: dict[str, Any]) -> str:
    """One line per round of ``distill --rounds N``: QBER, f, disclosed bits (λ) and key, or why it aborted."""
    if r["aborted"]:
        return f"{index:>5}  ABORTED in {r['stage']}: {r['reason']}"
    f = r["reconciliation_efficiency"]
    disclosed = sum(r["leakage_bits"].values())
    return (f"{index:>5}  {'accepted':<9} {100 * r['qber_z']:>6.2f} % {'n/a' if f is None else f'{f:.3f}':>6} "
            f"{disclosed:>10} {r['key_bits']:>10}")


def _progress(done: int, total: int, accepted: int, bits: int) -> None:
    if total <= 1:
        return
    width = 30
    filled = int(width * done / total)
    bar = "#" * filled + "." * (width - filled)
    end = "\n" if done == total else ""
    print(f"\r[{bar}] {done}/{total} rounds, {accepted} accepted, {bits} secret bits", end=end, file=sys.stderr,
          flush=True)


def resolve_pulses(params: DeviceParams, pulses: int | None) -> int:
    """Pulses per frame: the given number (checked), or by default a frame that follows the distance."""
    return frame_pulses(params) if pulses is None else check_pulses(pulses)


def round_config(args: argparse.Namespace, params: DeviceParams) -> RoundConfig:
    """The round settings the flags describe, checked before any frame is simulated.

    Raises :class:`ConfigError` naming the flag (the Python API, :mod:`qkdstack.api`, calls this too).
    """
    if args.rounds < 1:
        raise ConfigError(f"--rounds must be at least 1, got {args.rounds}")
    for flag, value in (("--eps-sec", args.eps_sec), ("--eps-cor", args.eps_cor)):
        if not 0 < value < 1:
            raise ConfigError(f"{flag} must lie in (0, 1), got {value}")
    for flag, value in (("--max-qber", args.max_qber), ("--max-phase-error", args.max_phase_error)):
        if not 0 < value <= 0.5:
            raise ConfigError(f"{flag} must lie in (0, 0.5] (an error rate), got {value}")
    return RoundConfig.for_source(
        params.source, eps_sec=args.eps_sec, eps_cor=args.eps_cor, max_qber=args.max_qber,
        max_phase_error=args.max_phase_error, cascade_schedule=args.cascade_schedule,
        reconciliation=args.reconciliation,
    )


def distill_rounds(
    params: DeviceParams,
    config: RoundConfig,
    *,
    pulses: int,
    rounds: int,
    eve: Eavesdropper,
    seed: int | None,
    run_async: Callable[[Coroutine[Any, Any, Any]], Any] = asyncio.run,
    reproducible: int | None = None,
) -> Iterator[dict[str, Any]]:
    """Yield one report per round: a frame of a device seeded with ``seed``, distilled in memory.

    ``run_async`` runs a round's coroutine to completion (``asyncio.run`` by default; the Python API
    passes one that works inside a running event loop, such as Jupyter's). ``reproducible``: the rounds'
    public randomness comes from one stream seeded with it (protocol/public_random.py; keys not secret).
    """
    device = SimulatedDevice(params, eve=eve, seed=seed)
    source = None if reproducible is None else public_random.stream(reproducible)
    for _ in range(rounds):
        t0 = time.perf_counter()
        frame = device.run_frame(pulses)
        sim_s = time.perf_counter() - t0
        alice_out, _bob_out = run_async(public_random.run_using(source, run_in_memory(frame, config)))
        report = _round_report(alice_out, pulses, params.source.rep_rate_hz, time.perf_counter() - t0)
        report["simulation_seconds"] = sim_s
        yield report


def run(args: argparse.Namespace) -> int:
    if getattr(args, "plot", None):
        from qkdstack.plots import require_matplotlib

        require_matplotlib()  # before any frame: a missing matplotlib is one sentence and exit 2
    params = device_params_from_args(args)
    config = round_config(args, params)
    eve = parse_eve(args.eve)
    pulses = resolve_pulses(params, args.pulses)
    from qkdstack.commands.warmup import compile_notice

    compile_notice()  # a fresh install compiles the kernels first (about 30 s): say so rather than seem stuck
    if args.reproducible is not None:
        print(f"qkdstack distill: reproducible mode (--reproducible {args.reproducible}): the post-processing's "
              "public randomness is seeded, so keys are predictable and not secret (experiments only)",
              file=sys.stderr)
    reports = []
    secret_bits = accepted = 0
    start = time.perf_counter()
    rounds = distill_rounds(params, config, pulses=pulses, rounds=args.rounds, eve=eve, seed=args.seed,
                            reproducible=args.reproducible)
    table = not args.json and args.rounds > 1
    if table:
        print(_ROW_HEADER)
    for i, report in enumerate(rounds):
        reports.append(report)
        if not report["aborted"]:
            accepted += 1
            secret_bits += report["key_bits"]
        if not args.json and args.rounds == 1:
            _print_round(report, sys.stdout)
        if table:
            print(_round_row(i + 1, report), flush=True)
        if sys.stderr.isatty():  # a progress bar only on a terminal, never in a log or a pipe
            _progress(i + 1, args.rounds, accepted, secret_bits)
    wall = time.perf_counter() - start
    total_pulses = pulses * args.rounds
    summary = {
        "rounds": args.rounds,
        "accepted": accepted,
        "aborted": args.rounds - accepted,
        "secret_bits": secret_bits,
        "secret_key_rate_bit_per_pulse": secret_bits / total_pulses,
        "secret_key_rate_bit_per_s": secret_bits / total_pulses * params.source.rep_rate_hz,
        "wall_seconds": wall,
        "reproducible_seed": args.reproducible,
    }
    if args.reconciliation == "ldpc":
        ok = [r["ldpc_frames"] for r in reports if not r["aborted"]]
        summary["ldpc"] = {
            "codewords_decoded": sum(x["codewords"] for x in ok),
            "codewords_failed_first_decoding": sum(x["failed_first_decoding"] for x in ok),
            "blind_rounds": sum(x["blind_rounds"] for x in ok),
            "frames_given_up": sum(1 for r in reports if r["aborted"] and r["stage"] == "ldpc"),
        }
    if getattr(args, "plot", None):
        from qkdstack.plots import distill_data, distill_figure

        distill_figure(args.plot, distill_data(reports, summary, distance_km=params.channel.length_km,
                                               max_qber=args.max_qber))
    if args.json:
        json.dump({"summary": summary, "rounds": reports}, sys.stdout, indent=2, default=float)
        print()
    elif args.rounds > 1:
        print(f"{accepted}/{args.rounds} rounds accepted, {secret_bits} secret bits, "
              f"{summary['secret_key_rate_bit_per_s']:.4g} bit/s at {params.source.rep_rate_hz:.3g} Hz "
              f"({wall:.1f} s wall)")
    return 0 if accepted else 1
