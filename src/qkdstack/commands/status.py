"""``qkdstack status --config site.toml``: a site's state, from the ``status.json`` its node writes."""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

from qkdstack.errors import ConfigError

STALE_AFTER_S = 120.0
"""A status older than this (and not from a node that finished) says the node is probably not running."""


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "status",
        help="print a site's state: links, rounds, key rates, key store, authentication pool, relays",
        description="Print the state of the site whose configuration is given, from the status.json its "
        "node writes (docs/node.md): rounds, QBER, key rates, real-time factor, store and pool levels, "
        "recent aborts, and for a site of a network every link and the relay counters.",
    )
    parser.add_argument("--config", required=True, help="the site's TOML configuration")
    parser.add_argument("--json", action="store_true", help="print status.json as it is")
    parser.set_defaults(func=run)


def _num(value: Any, unit: str = "", scale: float = 1.0, fmt: str = ".4g") -> str:
    if not isinstance(value, int | float) or isinstance(value, bool):
        return "n/a"
    return f"{value * scale:{fmt}}{unit}"


def _link_lines(doc: dict[str, Any], indent: str) -> list[str]:
    last = doc.get("last_round") or {}
    pool = doc.get("auth_pool") or {}
    lines = [
        f"{indent}rounds          {doc.get('rounds_accepted', 0)} accepted, {doc.get('rounds_aborted', 0)} aborted"
        + (" (finished: only serving keys)" if doc.get("finished") else ""),
        f"{indent}secret key      {doc.get('secret_bits', 0)} bits; "
        f"{_num(doc.get('secret_key_rate_bit_per_s_wall'), ' bit/s')} of wall time, "
        f"{_num(doc.get('secret_key_rate_bit_per_s_device'), ' bit/s')} of device time; "
        f"real-time factor {_num(doc.get('real_time_factor'), fmt='.3f')}",
    ]
    if last.get("accepted"):
        qber_z, qber_x = (_num(last.get(k), " %", 100, ".2f") for k in ("qber_z", "qber_x"))
        lines.append(f"{indent}last round      accepted: QBER {qber_z} (key basis), {qber_x} (test basis), "
                     f"{last.get('key_bits')} key bits")
    elif last:
        lines.append(f"{indent}last round      ABORTED in {last.get('stage')}: {last.get('reason')}")
    lines.append(f"{indent}key store       {(doc.get('store') or {}).get('stored_keys', 'n/a')} keys; "
                 f"authentication pool {pool.get('balance_bits', 'n/a')} bits")
    for abort in doc.get("recent_aborts") or []:
        lines.append(f"{indent}recent abort    {abort}")
    return lines


def render(doc: dict[str, Any], now: float | None = None) -> str:
    """The status document as a few lines of text (no key bytes: the document holds none)."""
    now = time.time() if now is None else now
    age = now - float(doc.get("updated") or 0)
    links = doc.get("links")
    head = f"site {doc.get('site')}" + ("" if links is not None else f" ({doc.get('role')} of link {doc.get('link')})")
    lines = [f"{head}; status written {age:.0f} s ago"
             + ("" if age < STALE_AFTER_S or doc.get("finished") else " (is the node running?)")]
    for key, label in (("etsi014_url", "ETSI 014"), ("skip_url", "SKIP"), ("network_url", "KME-to-KME"),
                       ("dashboard_url", "dashboard")):
        if doc.get(key):
            lines.append(f"  {label:<15} {doc[key]}")
    if links is None:
        lines += _link_lines(doc, "  ")
        return "\n".join(lines)
    lines += _link_lines(doc, "  ")
    for link in links:
        up = "up" if link.get("kme_link_up") else "down"
        lines.append(f"  link to {link.get('peer')} ({link.get('role')}, KME link {up})")
        lines += _link_lines(link, "    ")
    relay = doc.get("relay") or {}
    if relay:
        lines.append("  relays          " + ", ".join(f"{k} {v}" for k, v in relay.items()))
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from qkdstack.node.site_config import load_site_config

    site = load_site_config(args.config, check_files=False)
    path = site.data_dir / "status.json"
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"--config: site {site.name} has no {path} yet: its node has not run") from None
    except (OSError, ValueError) as exc:
        raise ConfigError(f"--config: {path} cannot be read ({type(exc).__name__})") from None
    print(json.dumps(doc, indent=1) if args.json else render(doc))
    return 0
