"""``qkdstack node --config site.toml``: run one site (node/service.py; a multi-link site: node/site.py)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import logging
import os
import signal
import sys
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any

from qkdstack.node.site_config import check_site_listen_addresses, load_site_config
from qkdstack.ops.logs import TEXT_FORMAT
from qkdstack.ops.logs import configure as configure_logs

if TYPE_CHECKING:
    from qkdstack.node.service import Node
    from qkdstack.node.site import Site


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "node",
        help="run one site: device half, authenticated post-processing, key store and ETSI 014 server",
        description="Run one QKD site from its configuration file until interrupted (or until "
        "[protocol] rounds rounds are done, after which it keeps serving keys).",
    )
    parser.add_argument("--config", required=True, help="the site's TOML configuration")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    parser.add_argument("--log-format", default="text", choices=["text", "json"],
                        help="text (default, readable) or json: one JSON object per line with event, site, link "
                        "and round (docs/operations.md)")
    parser.set_defaults(func=run)


async def _main(node: Node | Site) -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):  # Windows' loops have no signal handlers (Ctrl-C still stops)
            loop.add_signal_handler(sig, node.stop.set)
    await node.run()


def loop_runner() -> Callable[[Coroutine[Any, Any, Any]], Any]:
    """``uvloop.run`` where uvloop is installed (a faster event loop and TLS for the KME and the links),
    else ``asyncio.run``, said once in the log: uvloop exists for Linux and macOS only (pyproject.toml's
    environment marker leaves it out elsewhere)."""
    try:
        import uvloop
    except ImportError:
        logging.getLogger("qkdstack.node").info("uvloop is not installed here; running on asyncio's own event loop")
        return asyncio.run
    return uvloop.run


MALLOC_ARENAS = 2
"""glibc malloc arenas for a node (``M_ARENA_MAX``), unless ``MALLOC_ARENA_MAX`` is set in the environment."""


def limit_malloc_arenas(arenas: int = MALLOC_ARENAS) -> bool:
    """Cap glibc's malloc arenas before any thread starts; returns whether it was applied.

    A node frees large per-frame NumPy arrays on several worker threads; with glibc's default of up to
    8 arenas per core the freed memory stays spread over arenas and RSS creeps up (454 → 529 MiB in a
    10-minute run, 16 %); with two arenas it stayed within 7 % from first to last minute
    (benchmarks/bench_node.py --minutes 10, docs/performance.md). No effect on other C libraries.
    """
    if os.environ.get("MALLOC_ARENA_MAX") or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (musl has no arenas to cap)
        return False
    m_arena_max = -8  # <malloc.h>
    return bool(libc.mallopt(m_arena_max, arenas))


def _compile_notice() -> None:
    """Log that the first round waits for Numba (about 20 s, once per install), if the cache shows it will.

    Said only once every check of the configuration has passed: a bad configuration stays one sentence.
    """
    from qkdstack.commands.warmup import NODE_KERNELS, cold_kernels

    if cold_kernels(NODE_KERNELS):
        logging.getLogger("qkdstack.node").info("compiling the Numba kernels on this first run (once; later runs "
                                                "load them from the cache; `qkdstack warmup` compiles them ahead)")


def run(args: argparse.Namespace) -> int:
    limit_malloc_arenas()
    logging.basicConfig(level=args.log_level.upper(), format=TEXT_FORMAT)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per KME-to-KME request is noise, not news
    # Everything the configuration names is checked before anything starts (files, TLS material, the
    # addresses to listen on): a bad configuration is one sentence and exit code 2, with no state written.
    site = load_site_config(args.config)
    config = site.first
    links = ",".join("-".join(sorted((site.name, peer))) for peer in site.peers)
    configure_logs(args.log_level, args.log_format, site=site.name, link=links)
    check_site_listen_addresses(site)
    # The service's imports (NumPy, Numba, FastAPI, uvloop) only once the configuration is known to be good.
    run_loop = loop_runner()
    from qkdstack.kms.etsi014 import TLSFiles, server_ssl_context, tune_gc_for_serving

    kms = config.kms
    if kms.tls_cert:  # the ETSI 014 server's own loading, [kms] crl included, before any state is written
        server_ssl_context(TLSFiles(*(config.resolve(p) for p in (kms.tls_cert, kms.tls_key, kms.ca_cert)),
                                    config.resolve(kms.crl) if kms.crl else None))
    runner: Node | Site
    if site.multi_link:
        from qkdstack.node.site import Site

        runner = Site(site)
    else:
        from qkdstack.node.service import Node

        runner = Node(config)
    tune_gc_for_serving()  # fewer, shorter GC pauses in the ETSI 014 server (p99 latency)
    _compile_notice()
    run_loop(_main(runner))  # uvloop where it exists: faster event loop and TLS for the KME and the links
    return 0
