"""``qkdstack tunnel``: forward a local TCP port at site A to a service at site B.

Run one end at each site::

    # site B (exit): accept tunnel connections on :7000, forward to the service on :8080
    qkdstack tunnel --mode exit --listen 0.0.0.0:7000 --connect 127.0.0.1:8080 \\
        --kme-url https://kme-b:8443 --cert sae-b.pem --key sae-b.key --ca ca-b.pem --peer-sae sae-a
    # site A (entry): clients connect to :8000 as if it were the service
    qkdstack tunnel --mode entry --listen 127.0.0.1:8000 --connect site-b:7000 \\
        --kme-url https://kme-a:8443 --cert sae-a.pem --key sae-a.key --ca ca-a.pem --peer-sae sae-b
    curl http://127.0.0.1:8000/

Keys come from the site's KME over ETSI GS QKD 014 with mutual TLS: the entry is the
master SAE (``--peer-sae`` names the exit's SAE ID), the exit the slave (``--peer-sae``
names the entry's SAE ID). See :mod:`qkdstack.apps.tunnel` for the protocol.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal

from qkdstack.apps.keysource import Etsi014Client
from qkdstack.apps.tunnel import Tunnel, TunnelConfig, parse_hostport
from qkdstack.commands.validate import dashed
from qkdstack.errors import ConfigError

# The checks of TunnelConfig, parse_hostport and Etsi014Client name a value by its flag without dashes.
_FLAGS = frozenset({"mode", "listen", "connect", "kme-url", "cert", "key", "ca", "peer-sae", "rekey-seconds",
                    "rekey-bytes", "otp-refill-bytes", "qkd-key-bits", "record-bytes"})


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "tunnel",
        help="TCP tunnel protected with hybrid QKD keys or a one-time pad",
        description="Forward a local TCP port at site A (entry) to a service at site B (exit), protected "
        "with AES-256-GCM under hybrid QKD + ML-KEM-768 + X25519 keys rekeyed from fresh QKD keys, "
        "or with a one-time pad (--otp).",
    )
    p.add_argument("--mode", choices=["entry", "exit"], required=True, help="entry (site A) or exit (site B)")
    p.add_argument("--listen", required=True, metavar="HOST:PORT", help="where this end accepts connections")
    p.add_argument("--connect", required=True, metavar="HOST:PORT", help="entry: the exit's address; exit: the service")
    g = p.add_argument_group("key source (ETSI GS QKD 014 over mutual TLS)")
    g.add_argument("--kme-url", required=True, help="this site's KME, e.g. https://127.0.0.1:8443")
    g.add_argument("--cert", required=True, help="this SAE's client certificate (PEM); its CN is the SAE ID")
    g.add_argument("--key", required=True, help="the client certificate's private key (PEM)")
    g.add_argument("--ca", required=True, help="CA certificate(s) that sign the KME's server certificate (PEM)")
    g.add_argument("--peer-sae", required=True, help="the other end's SAE ID (slave for entry, master for exit)")
    p.add_argument("--rekey-seconds", type=float, default=60.0, help="rekey at least this often, s (default 60)")
    p.add_argument(
        "--rekey-bytes", type=int, default=64 * 1024 * 1024, help="rekey after this many bytes (default 64 MiB)"
    )
    p.add_argument("--otp", action="store_true", help="one-time-pad mode: QKD key for every byte")
    p.add_argument(
        "--otp-refill-bytes", type=int, default=65536, help="one-time pad fetched per key request (default 65536)"
    )
    p.add_argument("--qkd-key-bits", type=int, default=256, help="QKD key per handshake/rekey, bits (default 256)")
    p.add_argument("--record-bytes", type=int, default=16384, help="largest data record, bytes (default 16384)")
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    p.set_defaults(func=run)


def _check_file(path: str, flag: str) -> None:
    if not os.path.isfile(path):
        raise ConfigError(f"{flag}: {path!r} is not a file")


async def _main(config: TunnelConfig, keys: Etsi014Client) -> None:
    """Serve until SIGINT or SIGTERM, then close the connections and log what the tunnel consumed.

    Both signals get a handler of their own, as ``qkdstack node`` does: SIGTERM is how service managers stop
    a process, and a process started in the background by a shell inherits SIGINT *ignored*, so asyncio's
    own Ctrl-C handling (installed only over Python's default handler) would leave it running.
    """
    loop = asyncio.get_running_loop()
    async with keys:
        tunnel = Tunnel(config, keys)
        await tunnel.start()
        serving = asyncio.ensure_future(tunnel.serve_forever())
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError):  # Windows' loops have no signal handlers
                loop.add_signal_handler(sig, serving.cancel)
        try:
            with contextlib.suppress(asyncio.CancelledError):
                await serving
        finally:
            await tunnel.close()
            s = tunnel.stats
            logging.getLogger("qkdstack.apps.tunnel").info(
                "tunnel %s stopped: %d connections, %d rekeys, QKD key consumed %d bits "
                "(handshakes %d, rekeys %d, one-time pad %d)",
                config.mode, s.connections, s.rekeys, s.qkd_bits_consumed,
                s.qkd_bits_handshake, s.qkd_bits_rekey, s.qkd_bits_otp,
            )  # fmt: skip


def run(args: argparse.Namespace) -> int:
    try:  # every flag is checked (and the TLS files loaded) before the tunnel starts
        config = TunnelConfig(
            mode=args.mode,
            listen=parse_hostport(args.listen, "listen"),
            connect=parse_hostport(args.connect, "connect"),
            rekey_seconds=args.rekey_seconds,
            rekey_bytes=args.rekey_bytes,
            otp=args.otp,
            record_bytes=args.record_bytes,
            qkd_key_bits=args.qkd_key_bits,
            otp_refill_bytes=args.otp_refill_bytes,
        )
        config.validate()
        for path, flag in ((args.cert, "cert"), (args.key, "key"), (args.ca, "ca")):
            _check_file(path, flag)
        keys = Etsi014Client(args.kme_url, args.peer_sae, args.cert, args.key, args.ca)
    except ConfigError as exc:
        raise dashed(exc, _FLAGS) from None
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        asyncio.run(_main(config, keys))
    except KeyboardInterrupt:
        return 130
    return 0
