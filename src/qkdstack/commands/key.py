"""``qkdstack key export``: one QKD key, consumed once, written as a standard tool's pre-shared key.

The key is taken from the site's KME like any consumer takes it: over ETSI GS QKD 014 (mutual TLS with
an SAE certificate) or by in-unit delivery (the Unix socket). At the first site (``--peer`` only) a new
key is taken for the peer SAE and its ``key_ID`` printed; at the other site the same key is fetched
with ``--key-id``. Each site then writes the same key in three forms (docs/apps.md):

* ``wireguard.conf``: a WireGuard ``PresharedKey`` line (32 bytes, base64; wg(8)), and
  ``wireguard.psk`` (the base64 key alone, for ``wg set ... preshared-key FILE``);
* ``swanctl-ppk.conf``: an IKEv2 post-quantum pre-shared key (RFC 8784) for strongSwan's
  ``swanctl.conf``: ``secrets { ppk... { secret, id } }`` and the connection's ``ppk_id`` /
  ``ppk_required``; the PPK ID is the key's ID (the same at both sites);
* ``tls-psk.txt``: a TLS 1.3 external PSK as ``IDENTITY:HEXKEY`` (GnuTLS ``--pskpasswd`` file format;
  identity and key for ``openssl s_server/s_client -psk_identity ID -psk HEX``), identity = key ID.
  TLS 1.3 mixes it with (EC)DHE (``psk_dhe_ke``, RFC 8446 section 4.2.9), so the session keys depend
  on both the QKD key and a fresh key exchange.

Files are written 0600 into ``--out`` (made 0700); existing files are never overwritten, and
everything that can be checked is checked before the key is taken (a key taken is gone from the
KME). Key bytes go to those files only, never to stdout, stderr or logs.
"""

from __future__ import annotations

import argparse
import base64
import os
import uuid
from pathlib import Path

from qkdstack.errors import ConfigError, QKDError

FORMATS = ("wireguard", "strongswan", "tls")
FILES = {"wireguard": ("wireguard.conf", "wireguard.psk"), "strongswan": ("swanctl-ppk.conf",),
         "tls": ("tls-psk.txt",)}
WIREGUARD_KEY_BYTES = 32


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("key", help="take a QKD key and export it for standard tools")
    sub = parser.add_subparsers(dest="key_command", metavar="ACTION")
    exp = sub.add_parser(
        "export",
        help="take one key (consumed once) and write it as WireGuard / strongSwan PPK / TLS 1.3 PSK files",
        description="Take one key from the site's KME (ETSI 014 or in-unit delivery) and write it as a WireGuard "
        "PresharedKey, a strongSwan swanctl.conf PPK (RFC 8784) and a TLS 1.3 external PSK. Run it with --peer "
        "at one site (prints the key_ID), then with --peer and --key-id at the other site.",
    )
    src = exp.add_argument_group("where the key comes from (one of)")
    src.add_argument("--config", metavar="SITE_TOML", help="the site's configuration: ETSI 014 at [kms] etsi_listen "
                     "with [kms] ca_cert and the SAE's certificate sae/SAE_ID.pem/.key next to it (qkdstack init)")
    src.add_argument("--etsi", metavar="URL", help="the KME's ETSI 014 URL (https://HOST:PORT)")
    src.add_argument("--local", metavar="SOCKET", help="the KME's in-unit delivery socket ([kms] local_socket)")
    exp.add_argument("--sae", metavar="SAE_ID", help="this consumer's SAE ID (with --config)")
    exp.add_argument("--tls-cert", metavar="PEM", help="client certificate (with --etsi)")
    exp.add_argument("--tls-key", metavar="PEM", help="its private key (with --etsi)")
    exp.add_argument("--ca", metavar="PEM", help="the site CA that signed the KME's certificate (with --etsi)")
    exp.add_argument("--peer", required=True, metavar="SAE_ID", help="the SAE at the other site")
    exp.add_argument("--key-id", metavar="UUID", help="fetch the key the peer took (default: take a new one)")
    exp.add_argument("--size", type=int, default=256, help="key size in bits for a new key (default 256; "
                     "WireGuard needs 256)")
    exp.add_argument("--format", action="append", choices=FORMATS, help="forms to write (repeatable; default all)")
    exp.add_argument("--name", default="qkd", help="connection name in the strongSwan stanza (default qkd)")
    exp.add_argument("--out", required=True, metavar="DIR", help="folder for the files (made 0700 if missing)")
    exp.set_defaults(func=run_export)
    parser.set_defaults(func=lambda _args: parser.print_help() or 2)


# --------------------------------------------------------------------------------------------
# The three forms


def wireguard_conf(key_id: str, key: bytes) -> str:
    b64 = base64.b64encode(key).decode()
    return (f"# qkdstack QKD key {key_id} as a WireGuard pre-shared key (32 bytes, base64), the same at both ends.\n"
            "# Put this line in the [Peer] section of each end's configuration (wg-quick), or run\n"
            "#   wg set WG_IFACE peer PEER_PUBLIC_KEY preshared-key wireguard.psk\n"
            f"PresharedKey = {b64}\n")


def strongswan_conf(key_id: str, key: bytes, name: str) -> str:
    short = uuid.UUID(key_id).hex[:12]
    return (f"# qkdstack QKD key {key_id} as an IKEv2 post-quantum pre-shared key (PPK, RFC 8784) for swanctl.conf,\n"
            "# the same at both ends: add ppk_id/ppk_required to the connection, the ppk secret to secrets.\n"
            "connections {\n"
            f"    {name} {{\n"
            f"        ppk_id = {key_id}\n"
            "        ppk_required = yes\n"
            "    }\n"
            "}\n"
            "secrets {\n"
            f"    ppk-{short} {{\n"
            f"        secret = 0x{key.hex()}\n"
            f"        id = {key_id}\n"
            "    }\n"
            "}\n")


def tls_psk_line(key_id: str, key: bytes) -> str:
    """``IDENTITY:HEXKEY`` (GnuTLS psk passwd format; OpenSSL takes ``-psk_identity IDENTITY -psk HEXKEY``)."""
    return f"{key_id}:{key.hex()}\n"


def render(formats: list[str], key_id: str, key: bytes, name: str) -> dict[str, str]:
    out: dict[str, str] = {}
    if "wireguard" in formats:
        out["wireguard.conf"] = wireguard_conf(key_id, key)
        out["wireguard.psk"] = base64.b64encode(key).decode() + "\n"
    if "strongswan" in formats:
        out["swanctl-ppk.conf"] = strongswan_conf(key_id, key, name)
    if "tls" in formats:
        out["tls-psk.txt"] = tls_psk_line(key_id, key)
    return out


# --------------------------------------------------------------------------------------------
# Taking the key


def _container(status: int, body: dict) -> tuple[str, bytes]:
    if status != 200:
        raise QKDError(f"the KME refused the request ({status}): {body.get('message', 'no message')}")
    try:
        entry = body["keys"][0]
        return str(uuid.UUID(entry["key_ID"])), base64.b64decode(entry["key"], validate=True)
    except (KeyError, IndexError, TypeError, ValueError):
        raise QKDError("the KME's answer holds no key") from None


def _from_etsi(url: str, cert: str, key_file: str, ca: str, args: argparse.Namespace) -> tuple[str, bytes]:
    import ssl

    import httpx

    _check_tls_files(cert, key_file, ca)
    try:
        ctx = ssl.create_default_context(cafile=ca)
        ctx.load_cert_chain(cert, key_file)
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError(f"--tls-cert/--tls-key/--ca cannot be loaded for TLS ({type(exc).__name__})") from None
    base = url.rstrip("/") + "/api/v1/keys"
    try:
        with httpx.Client(verify=ctx, timeout=30) as http:
            if args.key_id:
                r = http.get(f"{base}/{args.peer}/dec_keys", params={"key_ID": args.key_id})
            else:
                r = http.get(f"{base}/{args.peer}/enc_keys", params={"number": 1, "size": args.size})
    except httpx.HTTPError as exc:
        raise QKDError(f"the KME at {url} cannot be reached ({type(exc).__name__})") from None
    try:
        body = r.json()
    except ValueError:
        body = {}
    return _container(r.status_code, body)


def _check_tls_files(cert: str, key_file: str, ca: str) -> None:
    for flag, path in (("--tls-cert", cert), ("--tls-key", key_file), ("--ca", ca)):
        if not path or not Path(path).is_file():
            raise ConfigError(f"{flag} {path or '(missing)'} is not a file")


def _from_local(path: str, args: argparse.Namespace) -> tuple[str, bytes]:
    import asyncio

    from qkdstack.kms.local import LocalKeyClient

    async def take() -> tuple[int, dict]:
        async with LocalKeyClient(path) as client:
            if args.key_id:
                return await client.dec_keys(args.peer, [args.key_id])
            return await client.enc_keys(args.peer, number=1, size=args.size)

    try:
        status, body = asyncio.run(take())
    except (OSError, QKDError) as exc:
        raise QKDError(f"the in-unit delivery socket {path} cannot be used ({type(exc).__name__})") from None
    return _container(status, body)


def _source(args: argparse.Namespace) -> tuple[str, tuple[str, ...]]:
    chosen = [n for n in ("config", "etsi", "local") if getattr(args, n)]
    if len(chosen) != 1:
        raise ConfigError("give exactly one of --config, --etsi, --local")
    if args.config:
        from qkdstack.node.config import load_config

        if not args.sae:
            raise ConfigError("--config needs --sae (this consumer's SAE ID)")
        cfg = load_config(args.config, check_files=False)
        if not cfg.kms.tls_cert:
            raise ConfigError(f"{args.config} has no ETSI 014 server ([kms] tls_cert is empty)")
        host, _, port = cfg.kms.etsi_listen.rpartition(":")
        folder = Path(args.config).parent / "sae"
        return "etsi", (f"https://{host}:{port}", str(folder / f"{args.sae}.pem"), str(folder / f"{args.sae}.key"),
                        str(cfg.resolve(cfg.kms.ca_cert)))
    if args.etsi:
        return "etsi", (args.etsi, args.tls_cert or "", args.tls_key or "", args.ca or "")
    return "local", (args.local,)


def run_export(args: argparse.Namespace) -> int:
    formats = list(dict.fromkeys(args.format or FORMATS))
    if args.key_id:
        try:
            uuid.UUID(args.key_id)
        except ValueError:
            raise ConfigError(f"--key-id must be a key ID (UUID), got {args.key_id!r}") from None
    elif args.size <= 0 or args.size % 8:
        raise ConfigError(f"--size must be a positive multiple of 8 bits, got {args.size}")
    if "wireguard" in formats and not args.key_id and args.size != 8 * WIREGUARD_KEY_BYTES:
        raise ConfigError(f"--size must be {8 * WIREGUARD_KEY_BYTES} for the wireguard form (WireGuard's "
                          "PresharedKey is 32 bytes); leave out --format wireguard for other sizes")
    if not args.name.replace("-", "").replace("_", "").isalnum():
        raise ConfigError(f"--name must be letters, digits, - and _, got {args.name!r}")
    out = Path(args.out)
    names = [f for fmt in formats for f in FILES[fmt]]
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} exists and is not a folder")
    taken = [n for n in names if (out / n).exists()]
    if taken:
        raise ConfigError(f"--out {out} already holds {taken[0]}; choose another folder (files are never overwritten)")
    kind, where = _source(args)
    if kind == "etsi":
        _check_tls_files(*where[1:])  # before --out is made: a refused command leaves nothing behind
    elif not Path(where[0]).is_socket():
        raise ConfigError(f"--local {where[0]} is not a Unix socket (the KME's [kms] local_socket, made while its "
                          "node runs)")
    try:
        out.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"--out {out} cannot be made ({exc.strerror or exc})") from None
    if not os.access(out, os.W_OK):
        raise ConfigError(f"--out {out} is not writable")
    # Everything checkable is checked: take the key now (it is gone from the KME after this).
    key_id, key = _from_etsi(*where, args) if kind == "etsi" else _from_local(where[0], args)
    if "wireguard" in formats and len(key) != WIREGUARD_KEY_BYTES:
        formats.remove("wireguard")
        print(f"qkdstack key export: key {key_id} has {8 * len(key)} bits, not 256: no WireGuard form written")
    from qkdstack.certs import atomic_write

    files = render(formats, key_id, key, args.name)
    for name, text in files.items():
        atomic_write(out / name, text.encode(), 0o600)
    print(f"key_ID {key_id}")
    for name in files:
        print(f"  {out / name}")
    if not args.key_id:
        print(f"At the other site: qkdstack key export ... --peer <this SAE> --key-id {key_id}")
    return 0
