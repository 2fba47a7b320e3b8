"""``qkdstack psk``: make a new pre-shared key file for a link (the first bootstrap, or the way back after one).

A pre-shared key seeds a link's authentication pool once and is then consumed by the node
(:mod:`qkdstack.auth.psk`). A link whose pool is lost or exhausted needs a new PSK at both sites:
make it here, copy the file out of band to the other site, put it where ``[auth] psk_file`` points
at both sites, and remove both sites' ``data/auth-pool.json`` (docs/node.md, "Starting a link again").
"""

from __future__ import annotations

import argparse

from qkdstack.auth.psk import DEFAULT_PSK_BYTES, generate_psk_file
from qkdstack.commands.validate import as_flags, new_file
from qkdstack.errors import ConfigError

# generate_psk_file's checks name what they check; these are the flags that set it.
_FLAGS = {"psk bytes": "--bytes", "psk link_id": "--link", "psk file": "--out"}


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "psk",
        help="make a new pre-shared key file for a link",
        description="Write a new pre-shared key (OS CSPRNG, mode 0600) for the link between two sites. Copy the "
        "file to both sites out of band; compare the printed check value at both sites.",
    )
    parser.add_argument("--link", required=True, help="the link ID: the two site names sorted and joined by '-' (A-B)")
    parser.add_argument("--out", required=True, help="file to write (must not exist)")
    parser.add_argument("--bytes", type=int, default=DEFAULT_PSK_BYTES,
                        help=f"authentication key bytes (even, at least 128; default {DEFAULT_PSK_BYTES})")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    try:
        check = generate_psk_file(new_file("--out", args.out), args.bytes, link_id=args.link)
    except ConfigError as exc:
        raise as_flags(exc, _FLAGS) from None
    except OSError as exc:
        raise ConfigError(f"--out {args.out} cannot be written ({exc.strerror or exc})") from None
    print(f"wrote {args.out} for link {args.link}; check value {check} (compare it at both sites)")
    return 0
