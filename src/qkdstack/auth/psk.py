"""Pre-shared-key bootstrap: a key file made once, copied out of band to both sites, seeds the pool.

File format (UTF-8 text, mode 0600)::

    qkdstack-psk v1
    link: A-B
    bytes: 1024
    check: 3f2a9c0d5e7b1a44
    key:
    <base64 of the key, 76 characters a line>

``check`` is the first 8 bytes of SHA-256("qkdstack-psk-check" || key) in hex, so operators can confirm
both copies are identical (and a damaged copy is detected) without comparing key bytes. The file
seeds both pools identically (:meth:`~qkdstack.auth.pool.AuthKeyPool.from_seed`); after the first two
rounds the pool holds only QKD key and skips what is left of the PSK, so a PSK leaked afterwards is
useless (see docs/authentication.md).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import secrets
import stat
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qkdstack.auth.pool import AuthKeyPool
from qkdstack.certs import atomic_write
from qkdstack.errors import ConfigError

MAGIC = "qkdstack-psk v1"
DEFAULT_PSK_BYTES = 1024
MIN_PSK_BYTES = 128


def _check(key: bytes) -> str:
    return hashlib.sha256(b"qkdstack-psk-check" + key).digest()[:8].hex()


@dataclass(frozen=True)
class PreSharedKey:
    """A loaded pre-shared key; the key bytes never appear in ``repr``."""

    link_id: str
    key: bytes = field(repr=False)

    @property
    def check(self) -> str:
        return _check(self.key)


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
    key = secrets.token_bytes(n_bytes)
    body = "\n".join(textwrap.wrap(base64.b64encode(key).decode(), 76))
    text = f"{MAGIC}\nlink: {link_id}\nbytes: {n_bytes}\ncheck: {_check(key)}\nkey:\n{body}\n"
    atomic_write(p, text.encode(), 0o600)
    return _check(key)


def load_psk(path: str | os.PathLike[str]) -> PreSharedKey:
    """Read and validate a PSK file (mode must be 0600 or stricter; length and check must match)."""
    p = Path(path)
    try:
        mode = stat.S_IMODE(p.stat().st_mode)
        text = p.read_text()
    except OSError as exc:
        raise ConfigError(f"psk file {p} cannot be read ({exc.strerror}).") from None
    if mode & 0o077:
        raise ConfigError(f"psk file {p} must not be readable by group or others (chmod 600).")
    lines = text.splitlines()
    try:
        if lines[0] != MAGIC:
            raise ValueError
        hdr: dict[str, Any] = {}
        i = 1
        while lines[i] != "key:":
            name, _, value = lines[i].partition(": ")
            hdr[name] = value
            i += 1
        key = base64.b64decode("".join(lines[i + 1 :]), validate=True)
        n = int(hdr["bytes"])
        link = hdr["link"]
        check = hdr["check"]
    except (IndexError, KeyError, ValueError):
        raise ConfigError(f"psk file {p} is not in the qkdstack-psk v1 format.") from None
    if len(key) != n or not hmac.compare_digest(_check(key), check):
        raise ConfigError(f"psk file {p} is damaged (length or check value does not match).")
    return PreSharedKey(link, key)


def pool_from_psk(psk_path: str | os.PathLike[str], **pool_kwargs: Any) -> AuthKeyPool:
    """A new authentication key pool seeded from the PSK file (same at both sites); ``pool_kwargs`` go to the pool."""
    psk = load_psk(psk_path)
    return AuthKeyPool.from_seed(psk.link_id, psk.key, **pool_kwargs)
