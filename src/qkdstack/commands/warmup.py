"""``qkdstack warmup``: compile every Numba kernel ahead, once, into Numba's on-disk cache.

The kernels (simulation, sifting, estimation, Cascade, LDPC, Toeplitz hashing, varints) are
``@njit(cache=True)``: the first process that calls one compiles it (about 30 s for all of them on
a 2-core machine) and writes the machine code next to the module (``__pycache__``, or
``NUMBA_CACHE_DIR``); every later process loads it in milliseconds. Without this command the first
``distill``, ``simulate``, ``demo`` or ``node`` pays that time itself.

Warmup compiles them by doing the real work on small inputs, with the argument types the commands
use (a kernel is cached per signature): frames of the combined device in both after-pulse modes,
with and without after-pulses and dead time, and under each attack, a frame of the two-half (split)
device, the nodes' message encoding, and one distilled round each with Cascade and with LDPC at
10 km (3·10^7 pulses: the smallest frame there that yields key, so every stage runs). A second
warmup finds everything cached and takes a few seconds.

:func:`compile_notice` is the other half: ``simulate``, ``distill`` and ``demo`` call it before their first
frame and, when Numba's cache lacks a kernel every run needs, say once on stderr that this run
compiles first, so that a first run does not look stuck.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path

FRAME_KERNELS = ("qkdstack.physics.sampling:_sample_detections_kernel",)
"""Kernels every simulated frame runs (simulate, distill, node, demo): if one is not cached, the run compiles."""

SIMULATION_KERNELS = (*FRAME_KERNELS, "qkdstack.physics.records:_gather_sorted")
"""What ``simulate`` runs: a frame, and the receiver's look-up into the transmitter's record (which ``distill``'s
combined device never does, so it is not in :data:`FRAME_KERNELS`)."""

DISTILLATION_KERNELS = ("qkdstack.protocol.sifting:_split", "qkdstack.protocol.estimation:_class_counts",
                        "qkdstack.protocol.cascade_kernels:top_parities")
"""Kernels every distilled round runs (Cascade being the default). Only kernels a default round compiles: a
kernel listed here that it never runs would stay cold and make every later run say it compiles."""

LDPC_KERNELS = ("qkdstack.protocol.ldpc_decoder:decode_lanes_warm", "qkdstack.protocol.ldpc_decoder:_lane_block",
                "qkdstack.protocol.ldpc_decoder:_lane_rows", "qkdstack.protocol.ldpc_decoder:_rows_one")
"""The LDPC decoder's lane kernels (Bob, ``reconciliation = "ldpc"``): compiled by warmup's LDPC round, and cold
until a first LDPC round otherwise (not in DISTILLATION_KERNELS, which a Cascade round must leave all warm)."""

NODE_KERNELS = ("qkdstack.physics.split:_emit_kernel", "qkdstack.physics.split:_lookup_kernel",
                "qkdstack.transport.varint:_decode", *DISTILLATION_KERNELS)
"""Kernels every node runs (the two-half device, messages over TCP, a round): demo, node."""

_noticed = False


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    parser = subparsers.add_parser(
        "warmup",
        help="compile the Numba kernels ahead (once per install; later runs load them from the cache)",
        description="Compile every Numba kernel into Numba's on-disk cache, so that the first simulate, "
        "distill, demo or node does not spend about 30 s compiling. Run it once after installing.",
    )
    parser.set_defaults(func=run)


def _index_folders(module_dir: Path) -> list[Path]:
    """Where Numba's cache keeps the kernels of the modules in ``module_dir`` (numba/core/caching.py's locators):
    ``NUMBA_CACHE_DIR``/<folder>_<sha1 of its path>, else the ``__pycache__`` beside the modules if it can be
    written. Empty where Numba would choose another place (its user-wide cache): then nothing is said."""
    env = os.environ.get("NUMBA_CACHE_DIR")
    if env:
        folder = os.path.abspath(module_dir)
        return [Path(env) / f"{os.path.basename(folder)}_{hashlib.sha1(folder.encode()).hexdigest()}"]
    pycache = module_dir / "__pycache__"
    if os.access(pycache if pycache.exists() else module_dir, os.W_OK):
        return [pycache]
    return []


def cold_kernels(kernels: Iterable[str]) -> list[str]:
    """Those of ``kernels`` (``package.module:function``) that Numba's on-disk cache does not hold yet.

    Cheap (a few ``glob`` calls, NumPy and Numba not imported): it looks for the index file Numba
    writes for each kernel, ``module.function-LINE.pyXY.nbi``. An empty list where the cache's
    place is not the usual one (nothing is said rather than something wrong).
    """
    import qkdstack

    root = Path(qkdstack.__file__).resolve().parent
    tag = f"py{sys.version_info.major}{sys.version_info.minor}"
    cold = []
    for kernel in kernels:
        dotted, _, name = kernel.partition(":")
        parts = dotted.split(".")[1:]  # below qkdstack
        folders = _index_folders(root.joinpath(*parts[:-1]))
        if not folders:
            return []
        if not any(any(f.glob(f"{parts[-1]}.{name}-*.{tag}.nbi")) for f in folders):
            cold.append(kernel)
    return cold


def compile_notice(kernels: Iterable[str] = FRAME_KERNELS + DISTILLATION_KERNELS) -> bool:
    """Say once on stderr that this run compiles Numba kernels first, if the cache shows it will; True if said."""
    global _noticed
    if _noticed or not cold_kernels(kernels):
        return False
    _noticed = True
    print("qkdstack: compiling the Numba kernels on this first run (once, up to about 30 s; later runs load them from "
          "the cache; `qkdstack warmup` compiles them ahead)", file=sys.stderr, flush=True)
    return True


def _steps() -> list[tuple[str, Callable[[], object]]]:
    import numpy as np

    from qkdstack.cli import build_parser
    from qkdstack.commands.device_args import device_params_from_args
    from qkdstack.commands.distill import distill_rounds, resolve_pulses, round_config
    from qkdstack.commands.simulate import summarise
    from qkdstack.physics.device import SimulatedDevice
    from qkdstack.physics.eve import parse_eve
    from qkdstack.physics.split import SplitDevice
    from qkdstack.transport.varint import decode_increasing, decode_uvarints, encode_increasing, encode_uvarints

    def frames() -> None:
        for flags in ([], ["--afterpulse", "0.01", "--dead-time", "1e-8"]):
            args = build_parser(only="simulate").parse_args(["simulate", *flags])
            params = device_params_from_args(args)
            for mode in ("same-class", "next-gate"):
                for eve in ("none", "intercept-resend:0.5", "pns", "beamsplit:0.5"):
                    frame = SimulatedDevice(params, parse_eve(eve), seed=1, afterpulse_mode=mode).run_frame(100_000)
                    summarise(frame, params)  # the receiver's lookup into the transmitter's record
            summarise(SplitDevice(params, parse_eve("none"), seed=1).run_frame(100_000), params)
        # the nodes' messages over TCP: varints of counts and of increasing pulse indices
        values = np.arange(1, 1000, dtype=np.uint64)
        decode_uvarints(encode_uvarints(values), values.size)
        decode_increasing(encode_increasing(values), values.size)

    def distill(reconciliation: str) -> Callable[[], object]:
        def step() -> None:
            args = build_parser(only="distill").parse_args(["distill", "--distance-km", "10", "--pulses", "3e7",
                                                            "--seed", "1", "--reconciliation", reconciliation])
            params = device_params_from_args(args)
            config = round_config(args, params)
            pulses = resolve_pulses(params, args.pulses)
            for report in distill_rounds(params, config, pulses=pulses, rounds=1, eve=parse_eve("none"), seed=1):
                if report["aborted"]:  # not expected at 10 km; the kernels it reached are compiled all the same
                    print(f"  (the warm-up round aborted in {report['stage']}; later stages compile on first use)",
                          file=sys.stderr)

        return step

    return [("simulation (combined and split device, every attack) and message encoding", frames),
            ("a distilled round with Cascade", distill("cascade")),
            ("a distilled round with LDPC", distill("ldpc"))]


def run(args: argparse.Namespace) -> int:
    print("compiling the Numba kernels into Numba's cache (about 30 s the first time, a few seconds after)",
          flush=True)
    total = time.perf_counter()
    t0 = time.perf_counter()
    steps = _steps()  # imports NumPy, Numba and the kernel modules
    print(f"  imports  {time.perf_counter() - t0:.1f} s", flush=True)
    for name, step in steps:
        t0 = time.perf_counter()
        step()
        print(f"  {name}  {time.perf_counter() - t0:.1f} s", flush=True)
    print(f"done in {time.perf_counter() - total:.1f} s; later runs load the compiled kernels from the cache")
    return 0
