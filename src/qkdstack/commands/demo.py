"""``qkdstack demo``: two sites on loopback, keys distilled, delivered over ETSI 014 and used."""

from __future__ import annotations

import argparse
import asyncio

from qkdstack.commands.device_args import seed_value
from qkdstack.commands.validate import at_least, distance_km, new_folder, pulses_per_frame
from qkdstack.demo import DemoOptions, demo_ok, run_demo
from qkdstack.errors import ConfigError
from qkdstack.node.config import BOOTSTRAPS
from qkdstack.physics.eve import parse_eve


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="run two sites on loopback: distill keys, deliver them over ETSI 014, send a file through the tunnel",
        description="The whole system in one command: two node processes distill keys over a simulated fibre "
        "with authenticated post-processing, two key consumers fetch keys over ETSI GS QKD 014 with mutual "
        "TLS, and a file crosses the QKD-keyed tunnel.",
    )
    parser.add_argument("--distance-km", type=distance_km, default=25.0, help="fibre length (default 25 km)")
    parser.add_argument("--bootstrap", choices=BOOTSTRAPS, default="psk", help="trust anchor of the first round")
    parser.add_argument("--eve", default="none", help="none | intercept-resend:FRACTION | pns | beamsplit:FRACTION")
    parser.add_argument("--rounds", type=at_least("--rounds", 1), default=None,
                        help="distillation rounds (default 4; with --topology 2 per link)")
    parser.add_argument("--pulses-per-frame", type=pulses_per_frame, default=None,
                        help="pulses per round (default: follows the distance, as qkdstack init)")
    parser.add_argument("--keep", metavar="DIR", nargs="?", const="",
                        help="keep the deployment (in DIR, or a temporary folder) and keep the nodes running, "
                        "dashboards live, until Ctrl-C")
    parser.add_argument("--seed", type=seed_value, default=None, help="seed of the device simulation, ≥ 0")
    parser.add_argument("--topology", metavar="FILE", default=None,
                        help="run a whole network instead (a topology TOML, e.g. examples/topologies/ring5.toml): "
                        "every site, keys relayed between the two SAEs farthest apart, a relay node killed and the "
                        "keys rerouted (docs/network.md)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    args.rounds = (2 if args.topology else 4) if args.rounds is None else args.rounds
    if args.rounds < 1:
        raise ConfigError(f"--rounds must be at least 1, got {args.rounds}")
    if args.topology is not None:
        from qkdstack.demo_network import NetworkDemoOptions, network_demo_ok, run_network_demo

        options = NetworkDemoOptions(topology=args.topology, rounds=args.rounds,
                                     pulses_per_frame=None if args.pulses_per_frame is None
                                     else int(args.pulses_per_frame))
        return 0 if network_demo_ok(asyncio.run(run_network_demo(options))) else 1
    # --distance-km, --pulses-per-frame, --rounds and --seed were checked as the line was parsed (the
    # configuration's own checks, commands/validate.py); the deployment folder is checked before any node starts.
    parse_eve(args.eve)
    if args.keep:
        new_folder("--keep", args.keep)
    opts = DemoOptions(distance_km=args.distance_km, bootstrap=args.bootstrap, eve=args.eve, rounds=args.rounds,
                       pulses_per_frame=None if args.pulses_per_frame is None else int(args.pulses_per_frame),
                       keep=args.keep, seed=args.seed)
    from qkdstack.commands.warmup import NODE_KERNELS, compile_notice

    compile_notice(NODE_KERNELS)  # a fresh install's nodes compile their kernels first (about 20 s): say so
    result = asyncio.run(run_demo(opts))
    return 0 if demo_ok(result, opts) else 1
