"""Pre-shared-key bootstrap: a key file made once, copied out of band to both sites, seeds the pool once.

File format (UTF-8 text, mode 0600)::

    qkdstack-psk v2
    link: A-B
    bytes: 1024
    check: 3f2a9c0d5e7b1a44
    key:
    <base64 of the key and 32 check bytes, 76 characters a line>

``bytes`` authentication key bytes are followed by 32 *check bytes* that are used for nothing else.
``check`` is a Wegman–Carter tag of the key under the check bytes (Poly1305 with ``(r, s)`` = the check
bytes, truncated to 64 bits): operators compare it at both sites, and the nodes compare it at every
connection, so a damaged or mismatched copy is refused before any key is used. Because ``s`` is
uniform and used only here, the check value is uniformly distributed whatever the key: publishing it
tells an unbounded adversary nothing about the authentication key (version 1 published 64 bits of a
SHA-256 of the key itself, which an unbounded adversary can use; its files are refused).

A PSK is used once. The node seeds its authentication pool from it and then *consumes* the file
(:func:`consume_psk`): the key is overwritten and the file keeps only its header and a ``consumed:``
line. Seeding twice from one PSK would reuse its pads and hash keys on different transcripts, which
breaks Wegman–Carter authentication (two tags under one ``(r, s)`` give an equation in ``r``). A node
whose pool file is lost therefore stops with one sentence asking for a new PSK (``qkdstack psk``).
After the first committed QKD refill the pool skips what is left of the PSK, so a PSK leaked afterwards
is useless (see docs/authentication.md).
"""

from __future__ import annotations

import base64
import datetime
import hmac
import os
import secrets
import stat
import struct
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.poly1305 import Poly1305

from qkdstack.auth.pool import AuthKeyPool
from qkdstack.certs import atomic_write
from qkdstack.errors import ConfigError

MAGIC = "qkdstack-psk v2"
OLD_MAGIC = "qkdstack-psk v1"
DEFAULT_PSK_BYTES = 1024
MIN_PSK_BYTES = 128
CHECK_BYTES = 32
"""Bytes after the key used only for the public check value: Poly1305 ``r`` (16) and ``s`` (16)."""
_CHECK_LABEL = b"qkdstack-psk-check/v2"


def _check(link_id: str, key: bytes, check_key: bytes) -> str:
    """64-bit one-time-padded universal hash of the key: uniform and independent of the key (see above)."""
    mac = Poly1305(check_key)
    mac.update(_CHECK_LABEL + struct.pack(">H", len(link_id.encode())) + link_id.encode() + key)
    return mac.finalize()[:8].hex()


@dataclass(frozen=True)
class PreSharedKey:
    """A loaded pre-shared key; the key bytes never appear in ``repr``."""

    link_id: str
    key: bytes = field(repr=False)
    check: str


def generate_psk_file(path: str | os.PathLike[str], n_bytes: int = DEFAULT_PSK_BYTES, link_id: str = "A-B") -> str:
    """Write a fresh pre-shared key of ``n_bytes`` (OS CSPRNG) to ``path`` with mode 0600; returns its check value.

    Refuses to overwrite an existing file (a PSK replaced at one site only would split the link).
    """
    if n_bytes < MIN_PSK_BYTES or n_bytes % 2:
        raise ConfigError(f"psk bytes must be an even number, at least {MIN_PSK_BYTES}.")
    if not link_id or "\n" in link_id:
        raise ConfigError("psk link_id must be a non-empty single line.")
    p = Path(path)
    if p.exists():
        raise ConfigError(f"psk file {p} already exists; remove it first to make a new one.")
    material = secrets.token_bytes(n_bytes + CHECK_BYTES)
    check = _check(link_id, material[:n_bytes], material[n_bytes:])
    body = "\n".join(textwrap.wrap(base64.b64encode(material).decode(), 76))
    text = f"{MAGIC}\nlink: {link_id}\nbytes: {n_bytes}\ncheck: {check}\nkey:\n{body}\n"
    atomic_write(p, text.encode(), 0o600)
    return check


def _read(p: Path) -> tuple[dict[str, str], list[str]]:
    """The header fields and the lines after ``key:`` (none for a consumed file) of a PSK file."""
    try:
        mode = stat.S_IMODE(p.stat().st_mode)
        text = p.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"psk file {p} cannot be read ({getattr(exc, 'strerror', None) or exc}).") from None
    if mode & 0o077:
        raise ConfigError(f"psk file {p} must not be readable by group or others (chmod 600).")
    lines = text.splitlines()
    if lines and lines[0] == OLD_MAGIC:
        raise ConfigError(
            f"psk file {p} is in the old qkdstack-psk v1 format, whose public check value reveals key bits; "
            "make a new pre-shared key with `qkdstack psk` and copy it to both sites."
        )
    if not lines or lines[0] != MAGIC:
        raise ConfigError(f"psk file {p} is not in the {MAGIC} format.")
    hdr: dict[str, str] = {}
    for i, line in enumerate(lines[1:], start=1):
        if line == "key:":
            return hdr, lines[i + 1 :]
        name, _, value = line.partition(": ")
        hdr[name] = value
    return hdr, []


def load_psk(path: str | os.PathLike[str]) -> PreSharedKey:
    """Read and validate a PSK file (mode 0600 or stricter; length and check must match; not yet consumed)."""
    p = Path(path)
    hdr, body = _read(p)
    if "consumed" in hdr:
        raise ConfigError(
            f"psk file {p} was consumed on {hdr['consumed']} when an authentication pool was seeded from it; a "
            "pre-shared key is used once (seeding again would reuse its one-time pads): make a new one with "
            "`qkdstack psk` and copy it to both sites."
        )
    try:
        material = base64.b64decode("".join(body), validate=True)
        n = int(hdr["bytes"])
        link, check = hdr["link"], hdr["check"]
    except (KeyError, ValueError):
        raise ConfigError(f"psk file {p} is not in the {MAGIC} format.") from None
    if len(material) != n + CHECK_BYTES or not hmac.compare_digest(
        _check(link, material[:n], material[n:]), check
    ):
        raise ConfigError(f"psk file {p} is damaged (length or check value does not match).")
    return PreSharedKey(link, material[:n], check)


def psk_check(path: str | os.PathLike[str]) -> str:
    """The public check value of a PSK file, consumed or not (what the nodes compare at connection)."""
    p = Path(path)
    hdr, _ = _read(p)
    if "check" not in hdr:
        raise ConfigError(f"psk file {p} is not in the {MAGIC} format.")
    return hdr["check"]


def consume_psk(path: str | os.PathLike[str]) -> None:
    """Erase the key from a PSK file, keeping its header and the time it was consumed.

    The key bytes are overwritten in place (and synced) before the file is replaced, so they do not
    linger in the old file's blocks; the header keeps the check value for the operator's records.
    """
    p = Path(path)
    hdr, _ = _read(p)
    if "consumed" in hdr:
        return
    size = p.stat().st_size
    with open(p, "r+b") as f:
        f.write(b"\0" * size)
        f.flush()
        os.fsync(f.fileno())
    when = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    head = "".join(f"{k}: {v}\n" for k, v in hdr.items())
    atomic_write(p, f"{MAGIC}\n{head}consumed: {when}\n".encode(), 0o600)


def pool_from_psk(psk_path: str | os.PathLike[str], **pool_kwargs: Any) -> AuthKeyPool:
    """A new authentication key pool seeded from the PSK file (same at both sites); ``pool_kwargs`` go to the pool."""
    psk = load_psk(psk_path)
    return AuthKeyPool.from_seed(psk.link_id, psk.key, seed_check=psk.check, **pool_kwargs)
