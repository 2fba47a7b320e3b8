"""``qkdstack simulate``: run the simulated device for one frame and compare with the theory.

Prints, per intensity class and sifted basis, the measured gain and QBER beside the
prediction of :mod:`qkdstack.theory.device` (Lim et al., PRA 89, 022307 (2014) model), and
totals (pulses, detections, wall time). The gain of a (class, basis) cell is its sifted
detections divided by the expected number of pulses sent in it, N·p_k·p_A·p_B: the
device's record is sparse and holds only materialised pulses, and the relative fluctuation
of that pulse count (≈ 1/sqrt(N p_k p_A p_B)) is far below that of the detections.

``--save DIR`` writes both parties' raw records of every frame (``--frames``) in the records
format of :mod:`qkdstack.physics.recorded` (docs/devices.md), for a node with
``[device] source = "records"`` or any other consumer of raw records.

``--plot FILE.png`` draws measured against expected gain and QBER per intensity
(:func:`qkdstack.plots.simulate_figure`): a photon-number-splitting attack, which keeps the signal's
gain and starves the decoys, shows as bars far below 1.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

import numpy as np

from qkdstack.commands.device_args import add_device_arguments, add_frame_arguments, device_params_from_args
from qkdstack.commands.validate import at_least, plot_file
from qkdstack.errors import ConfigError
from qkdstack.physics.device import SimulatedDevice, check_pulses
from qkdstack.physics.eve import parse_eve
from qkdstack.physics.params import DeviceParams
from qkdstack.physics.recorded import frame_numbers, save_frame, write_device_json
from qkdstack.physics.records import Frame
from qkdstack.physics.split import SplitDevice
from qkdstack.theory.device import expected_detection_prob, expected_qber

BASIS_NAMES = ("Z", "X")
DEFAULT_PULSES = 100_000_000
"""Pulses of a frame when ``--pulses`` is not given (the Python API's default too)."""


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``simulate`` sub-command."""
    parser = subparsers.add_parser(
        "simulate",
        help="simulate a frame of the decoy-state BB84 device and compare it with the theory",
        description="Simulate one frame of the decoy-state BB84 device; print measured gains and QBER per "
        "intensity and basis beside the model's prediction.",
    )
    add_device_arguments(parser)
    add_frame_arguments(parser)
    parser.add_argument(
        "--afterpulse-mode",
        choices=("same-class", "next-gate"),
        default="same-class",
        help="where after-pulses land: next gate of the same intensity (Lim 2014 model) or next live gate",
    )
    parser.add_argument(
        "--split", action="store_true", help="run the two-half form of the nodes (transmitter | light | receiver)"
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument(
        "--save", metavar="DIR", default=None,
        help="also write both parties' raw records of each frame to DIR (alice/ and bob/ frame files, format in "
        "docs/devices.md), numbered after any frames already there; a node with [device] source = \"records\" "
        "reads them",
    )
    parser.add_argument("--frames", type=at_least("--frames", 1), default=1,
                        help="frames to simulate (and save), default 1")
    parser.add_argument("--plot", type=plot_file, default=None, metavar="FILE.png",
                        help="save measured vs expected gain and QBER per intensity (of the last frame); needs "
                        "matplotlib: pip install 'qkdstack[plot]'")
    parser.set_defaults(func=run)


def summarise(frame: Frame, params: DeviceParams) -> list[dict[str, Any]]:
    """Per (intensity class, sifted basis): detections, errors, gain and QBER, with the theory's values."""
    src, rec = params.source, params.receiver
    k, a, bit = frame.alice.lookup(frame.bob.pulse_index)
    sifted = a == frame.bob.basis
    wrong = bit != frame.bob.bit
    n = frame.alice.n_pulses
    rows = []
    for cls, (mu, pk) in enumerate(zip(src.intensities, src.intensity_probs, strict=True)):
        for basis in (0, 1):
            sel = sifted & (k == cls) & (a == basis)
            det = int(np.count_nonzero(sel))
            err = int(np.count_nonzero(wrong & sel))
            pa = src.p_z if basis == 0 else 1 - src.p_z
            pb = rec.p_z if basis == 0 else 1 - rec.p_z
            pulses = n * pk * pa * pb
            rows.append(
                {
                    "class": cls,
                    "intensity": mu,
                    "basis": BASIS_NAMES[basis],
                    "pulses_expected": pulses,
                    "detections": det,
                    "errors": err,
                    "gain": det / pulses if pulses > 0 else None,
                    "gain_theory": expected_detection_prob(params, cls),
                    "qber": err / det if det else None,
                    "qber_theory": expected_qber(params, cls),
                }
            )
    return rows


def run(args: argparse.Namespace) -> int:
    """Entry point of ``qkdstack simulate``."""
    if getattr(args, "plot", None):
        from qkdstack.plots import require_matplotlib

        require_matplotlib()  # before the frame: a missing matplotlib is one sentence and exit 2
    params = device_params_from_args(args)
    eve = parse_eve(args.eve)
    try:
        pulses = check_pulses(DEFAULT_PULSES if args.pulses is None else args.pulses)
    except ConfigError as exc:
        raise ConfigError(f"--pulses: {exc}") from None
    device = SplitDevice(params, eve, seed=args.seed) if args.split else None
    if device is None:
        device = SimulatedDevice(params, eve, seed=args.seed, afterpulse_mode=args.afterpulse_mode)
    if args.frames < 1:
        raise ConfigError(f"--frames must be at least 1, got {args.frames}")
    first = 1
    if args.save is not None:
        try:
            first = 1 + max([0, *frame_numbers(args.save, "alice"), *frame_numbers(args.save, "bob")])
            write_device_json(args.save, params)
        except OSError as exc:
            raise ConfigError(f"--save: cannot write to {args.save} ({exc.strerror or exc})") from None
    from qkdstack.commands.warmup import SIMULATION_KERNELS, compile_notice

    # After every check of the input (a bad one stays one sentence): a fresh install compiles first, so say so.
    compile_notice(SIMULATION_KERNELS)
    # Load the compiled kernels on a throw-away device first, so that the time reported is the frame's.
    SimulatedDevice(params, eve, seed=0, afterpulse_mode=args.afterpulse_mode).run_frame(1000)
    elapsed = 0.0
    for i in range(args.frames):
        start = time.perf_counter()
        frame = device.run_frame(pulses)
        elapsed += time.perf_counter() - start
        if args.save is not None:
            try:
                save_frame(args.save, first + i, frame)
            except OSError as exc:
                raise ConfigError(f"--save: cannot write to {args.save} ({exc.strerror or exc})") from None
    rows = summarise(frame, params)
    truth = frame.ground_truth
    result: dict[str, Any] = {
        "distance_km": params.channel.length_km,
        "eve": str(eve),
        "form": "split" if args.split else "combined",
        "afterpulse_mode": "next-gate" if args.split else args.afterpulse_mode,
        "seed": args.seed,
        "pulses": pulses,
        "frames": args.frames,
        "saved_frames": [first, first + args.frames - 1] if args.save is not None else None,
        "simulated_time_s": pulses / params.source.rep_rate_hz,
        "detections": len(frame.bob),  # of the last frame (as everything below)
        "sifted": int(sum(r["detections"] for r in rows)),
        "elapsed_s": elapsed,
        "detections_per_s": args.frames * len(frame.bob) / elapsed if elapsed > 0 else None,
        "eve_knows_fraction_oracle": float(truth.eve_knows.mean()) if truth is not None and len(frame.bob) else 0.0,
        "classes": rows,
    }
    if getattr(args, "plot", None):
        from qkdstack.plots import simulate_data, simulate_figure

        simulate_figure(args.plot, simulate_data(result))
    if args.json:
        json.dump(result, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        print(format_table(result))
    return 0


def _fmt(x: float | None, spec: str) -> str:
    return "—" if x is None else format(x, spec)


def format_table(result: dict[str, Any]) -> str:
    """Human-readable report of :func:`run`'s result."""
    lines = [
        f"distance {result['distance_km']:g} km, eve {result['eve']}, {result['form']} form, "
        f"{result['pulses']:,} pulses ({result['simulated_time_s']:.4g} s of source time)",
        "",
        f"{'class':>5} {'mu':>6} {'basis':>5} {'detections':>11} {'gain':>11} {'gain theory':>11} "
        f"{'QBER %':>8} {'QBER th. %':>10}",
    ]
    for r in result["classes"]:
        q = None if r["qber"] is None else 100 * r["qber"]
        lines.append(
            f"{r['class']:>5} {r['intensity']:>6.3g} {r['basis']:>5} {r['detections']:>11,} "
            f"{_fmt(r['gain'], '11.4e')} {r['gain_theory']:>11.4e} {_fmt(q, '8.3f')} {100 * r['qber_theory']:>10.3f}"
        )
    lines += [
        "",
        f"detections {result['detections']:,} (sifted {result['sifted']:,}) in {result['elapsed_s']:.3f} s "
        f"({_fmt(result['detections_per_s'], '.3g')} detections/s)",
        f"Eve knows {100 * result['eve_knows_fraction_oracle']:.2f} % of Bob's detected bits (simulator oracle)",
    ]
    if result.get("saved_frames"):
        lo, hi = result["saved_frames"]
        lines.append(f"saved frames {lo}–{hi} (both parties' records; the table shows the last frame)")
    return "\n".join(lines)
