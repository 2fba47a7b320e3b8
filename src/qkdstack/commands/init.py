"""``qkdstack init``: write a ready two-site deployment, or with ``--topology FILE`` one for every site of a
network (see :mod:`qkdstack.node.deployment`, docs/network.md)."""

from __future__ import annotations

import argparse

from qkdstack.commands.validate import (
    check_sae_id,
    distance_km,
    make_folder,
    port,
    pulses_per_frame,
    site_names,
    store_url,
)
from qkdstack.errors import ConfigError
from qkdstack.node.config import BOOTSTRAPS
from qkdstack.node.deployment import network_ports, write_deployment, write_network_deployment


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "init",
        help="write configurations, keys and certificates for a two-site deployment or a network",
        description="Write a ready two-site deployment: node configurations, the bootstrap credentials "
        "(pre-shared key, PKI certificates or OpenPGP keys), the sites' TLS CAs, KME server certificates "
        "and the key consumers' (SAEs') client certificates. With --topology FILE, the same for every site "
        "of a network (docs/network.md).",
    )
    parser.add_argument("--sites", type=site_names, default=None,
                        help="the two site names, transmitter first (default A,B)")
    parser.add_argument("--topology", default=None, metavar="FILE",
                        help="a network topology (TOML: [sites.NAME] and [[links]]; docs/network.md): write a "
                        "deployment for every site instead of two")
    parser.add_argument("--out", required=True, help="folder to write (must be new or empty)")
    parser.add_argument("--bootstrap", choices=BOOTSTRAPS, default="psk", help="trust anchor of the first round")
    parser.add_argument("--base-port", type=port, default=7100, help="first of the loopback ports (default 7100)")
    parser.add_argument("--distance-km", type=distance_km, default=25.0,
                        help="simulated fibre length (default 25 km; with --topology: of links that give none)")
    parser.add_argument("--pulses-per-frame", type=pulses_per_frame, default=None,
                        help="pulses per round (default: follows the distance, at least 0.4 s of device time; "
                        "4e8 at 25 km, 4e9 at 100 km)")
    parser.add_argument("--store", type=store_url, default="sqlite:///data/keys.db",
                        help="key store: sqlite:///PATH (default) or a postgresql:// URL")
    parser.add_argument("--sae", action="append", default=[], metavar="SITE=ID[,ID]",
                        help="SAE IDs at a site (default SAE_<site>); repeat per site")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    # Flags a node would refuse later are refused now, before anything is written: the argparse types
    # (commands/validate.py) run the configuration's own checks on --sites, --distance-km,
    # --pulses-per-frame and --store; what depends on several flags is checked here.
    pulses = args.pulses_per_frame
    if args.topology is not None:
        return _run_topology(args, pulses)
    if not args.base_port <= 65535 - 13:
        raise ConfigError(f"--base-port must lie in 1..65522 (the deployment uses it and the next 13 ports), "
                          f"got {args.base_port}")
    sites = args.sites or ["A", "B"]
    sae_ids = {site: [f"SAE_{site}"] for site in sites}
    for entry in args.sae:
        site, _, ids = entry.partition("=")
        if site not in sae_ids or not ids:
            raise ConfigError(f"--sae must be SITE=ID[,ID] with SITE one of {', '.join(sites)}, got {entry!r}")
        sae_ids[site] = [check_sae_id("--sae", i.strip()) for i in ids.split(",") if i.strip()]
    make_folder("--out", args.out)
    layouts = write_deployment(
        args.out, sites, bootstrap=args.bootstrap, base_port=args.base_port, distance_km=args.distance_km,
        pulses_per_frame=None if pulses is None else int(pulses), store=args.store, sae_ids=sae_ids,
    )
    for layout in layouts.values():
        print(f"site {layout.name}: {layout.config}  (ETSI 014 at {layout.etsi_url}, SAEs {', '.join(layout.sae_ids)})")
    print(f"next: see {args.out}/README.txt")
    return 0


def _run_topology(args: argparse.Namespace, pulses: int | None) -> int:
    from qkdstack.network.topology import load_topology

    if args.sites is not None:
        raise ConfigError("--sites does not apply with --topology: the topology's [sites.NAME] tables name the sites")
    if args.sae:
        raise ConfigError("--sae does not apply with --topology: give each site's SAEs as sae = [...] in its "
                          "[sites.NAME] table")
    topology = load_topology(args.topology)
    network_ports(topology, args.base_port)  # --base-port against this topology's ports, before --out is made
    make_folder("--out", args.out)
    layouts = write_network_deployment(
        topology, args.out, bootstrap=args.bootstrap, base_port=args.base_port, store=args.store,
        distance_km=args.distance_km, pulses_per_frame=pulses,
    )
    for layout in layouts.values():
        saes = ", ".join(layout.sae_ids) or "none: a trusted relay node"
        print(f"site {layout.name}: {layout.config}  (ETSI 014 at {layout.etsi_url}, KME-to-KME at "
              f"{layout.kme_url}, SAEs {saes})")
    print(f"next: see {args.out}/README.txt")
    return 0
