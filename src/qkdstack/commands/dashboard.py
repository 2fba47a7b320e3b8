"""``qkdstack dashboard --deployment DIR``: one live page over every site of a deployment (docs/operations.md)."""

from __future__ import annotations

import argparse
import signal
import threading


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "dashboard",
        help="serve one live dashboard page over all sites of a deployment (reads their status and rounds)",
        description="Serve the live dashboard for every site of a deployment folder written by qkdstack init: "
        "each site's data/status.json and data/rounds.jsonl are read at every refresh, so the page works "
        "whether or not the nodes run their own admin listeners. Runs until interrupted.",
    )
    parser.add_argument("--deployment", required=True, metavar="DIR",
                        help="the deployment folder (DIR/<site>/site.toml)")
    parser.add_argument("--listen", default="127.0.0.1:8470", metavar="HOST:PORT",
                        help="where to serve the page (default 127.0.0.1:8470; a non-loopback address needs --token)")
    parser.add_argument("--token", default="", help="bearer token required for the data (the page reads it from "
                        "its address: http://HOST:PORT/#token=TOKEN)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from qkdstack.commands.validate import as_flags
    from qkdstack.errors import ConfigError
    from qkdstack.ops.dashboard import serve_deployment

    try:  # the [admin] listener's own checks (ops/admin.py), which name the field the flag sets
        server = serve_deployment(args.deployment, args.listen, args.token)
    except ConfigError as exc:
        raise as_flags(exc, {"[admin] listen": "--listen", "[admin] token": "--token"}) from None
    print(f"qkdstack dashboard: {server.url}/ (sites of {args.deployment}); Ctrl-C to stop", flush=True)
    done = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: done.set())
    try:
        while not done.wait(0.5):
            pass
    finally:
        server.stop()
    return 0
