"""``qkdstack init``: write a ready two-site deployment (see :mod:`qkdstack.node.deployment`)."""

from __future__ import annotations

import argparse

from qkdstack.errors import ConfigError
from qkdstack.node.config import BOOTSTRAPS
from qkdstack.node.deployment import write_deployment


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "init",
        help="write configurations, keys and certificates for a two-site deployment",
        description="Write a ready two-site deployment: node configurations, the bootstrap credentials "
        "(pre-shared key, PKI certificates or OpenPGP keys), the sites' TLS CAs, KME server certificates "
        "and the key consumers' (SAEs') client certificates.",
    )
    parser.add_argument("--sites", default="A,B", help="the two site names, transmitter first (default A,B)")
    parser.add_argument("--out", required=True, help="folder to write (must be new or empty)")
    parser.add_argument("--bootstrap", choices=BOOTSTRAPS, default="psk", help="trust anchor of the first round")
    parser.add_argument("--base-port", type=int, default=7100, help="first of the loopback ports (default 7100)")
    parser.add_argument("--distance-km", type=float, default=25.0, help="simulated fibre length (default 25 km)")
    parser.add_argument("--pulses-per-frame", type=float, default=None,
                        help="pulses per round (default: follows the distance, at least 0.4 s of device time; "
                        "4e8 at 25 km, 4e9 at 100 km)")
    parser.add_argument("--store", default="sqlite:///data/keys.db",
                        help="key store: sqlite:///PATH (default) or a postgresql:// URL")
    parser.add_argument("--sae", action="append", default=[], metavar="SITE=ID[,ID]",
                        help="SAE IDs at a site (default SAE_<site>); repeat per site")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    # Flags a node would refuse later are refused now, before anything is written.
    pulses = args.pulses_per_frame
    if pulses is not None and not (pulses == pulses and float(pulses).is_integer() and pulses >= 1000):  # NaN-safe
        raise ConfigError(f"--pulses-per-frame must be a whole number of pulses, at least 1000, got {pulses:g}")
    if not 1 <= args.base_port <= 65535 - 11:
        raise ConfigError(f"--base-port must lie in 1..65524 (the deployment uses it and the next 11 ports), "
                          f"got {args.base_port}")
    if not 0 <= args.distance_km < float("inf"):
        raise ConfigError(f"--distance-km must be a length ≥ 0 km, got {args.distance_km:g}")
    sites = [s.strip() for s in args.sites.split(",") if s.strip()]
    sae_ids = {site: [f"SAE_{site}"] for site in sites}
    for entry in args.sae:
        site, _, ids = entry.partition("=")
        if site not in sae_ids or not ids:
            raise ConfigError(f"--sae must be SITE=ID[,ID] with SITE one of {', '.join(sites)}, got {entry!r}")
        sae_ids[site] = [i.strip() for i in ids.split(",") if i.strip()]
    layouts = write_deployment(
        args.out, sites, bootstrap=args.bootstrap, base_port=args.base_port, distance_km=args.distance_km,
        pulses_per_frame=None if pulses is None else int(pulses), store=args.store, sae_ids=sae_ids,
    )
    for layout in layouts.values():
        print(f"site {layout.name}: {layout.config}  (ETSI 014 at {layout.etsi_url}, SAEs {', '.join(layout.sae_ids)})")
    print(f"next: see {args.out}/README.txt")
    return 0
