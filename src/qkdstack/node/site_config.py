"""A site's configuration: one or several QKD links, one key store, one KME, one set of listeners.

Two formats of ``site.toml`` (docs/node.md, docs/network.md):

* **two-site** (what ``qkdstack init`` writes for one link): a ``[site]`` with ``role`` and ``peer``
  and a top-level ``[link]``; read by :func:`qkdstack.node.config.load_config`, one link.
* **multi-link** (what ``qkdstack init --topology`` writes): a ``[site]`` with ``name`` and
  ``data_dir`` only, the site-wide ``[kms]`` and ``[admin]``, optional ``[device]``, ``[protocol]``
  and ``[auth]`` defaults, a ``[network]`` section (the KME-to-KME listener and the topology), and
  one ``[[links]]`` entry per link: ``peer``, ``role`` and sub-tables ``link``, ``device``,
  ``protocol``, ``auth`` that override the defaults field by field.

Each link becomes an ordinary :class:`~qkdstack.node.config.NodeConfig` (so every field is checked
exactly as for a two-site node), whose data directory is ``DATA_DIR/links/PEER`` (its pool,
``pending/``, ``rounds.jsonl`` and ``status.json``); the site's own ``status.json`` stays in
``DATA_DIR``. Errors are one sentence naming the entry and the field.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qkdstack.errors import ConfigError
from qkdstack.node.config import (
    NodeConfig,
    check_bind,
    check_files_of,
    check_listen_addresses,
    listen_addresses,
    load_config,
    parse_address,
    parse_config,
    read_toml,
)
from qkdstack.node.schema import field_error, load_section

LINK_SECTIONS = ("link", "device", "protocol", "auth")
"""The sub-tables a ``[[links]]`` entry may hold (each a section of the two-site format)."""
SITE_SECTIONS = ("site", "kms", "admin", "device", "protocol", "auth", "network", "links")


@dataclass(frozen=True)
class NetworkSection:
    """``[network]``: the KME-to-KME (key relay) listener, its mutual-TLS files and the topology file."""

    listen: str = ""
    topology: str = ""
    tls_cert: str = ""
    tls_key: str = ""
    ca_cert: str = ""

    def __post_init__(self) -> None:
        for name in ("listen", "topology", "tls_cert", "tls_key", "ca_cert"):
            if not getattr(self, name):
                raise field_error("network", name, "is required in a multi-link site")
        parse_address("network", "listen", self.listen)


@dataclass(frozen=True)
class SiteConfig:
    """A site: its links (one :class:`NodeConfig` each) and, for a multi-link site, its ``[network]``."""

    path: Path
    name: str
    links: tuple[NodeConfig, ...]
    network: NetworkSection | None = None
    data_dir_name: str = "."
    peers: tuple[str, ...] = field(default=())

    @property
    def multi_link(self) -> bool:
        return self.network is not None

    @property
    def first(self) -> NodeConfig:
        """The first link's configuration: its ``[kms]`` and ``[admin]`` are the site's."""
        return self.links[0]

    def resolve(self, relative: str) -> Path:
        p = Path(relative).expanduser()
        return p if p.is_absolute() else (self.path.parent / p)

    @property
    def data_dir(self) -> Path:
        return self.resolve(self.data_dir_name)


def _table(where: str, value: Any) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"{where} must be a table, got {type(value).__name__}")
    return value


def _link_config(data: dict[str, Any], entry: Any, index: int, path: Path) -> NodeConfig:
    """One ``[[links]]`` entry merged over the site's defaults, checked as a two-site configuration."""
    where = f"[[links]] entry {index}"
    entry = _table(f"{path.name}: {where}", entry)
    unknown = sorted(set(entry) - {"peer", "role", *LINK_SECTIONS})
    if unknown:
        raise ConfigError(f"{path.name}: {where}: unknown field {unknown[0]!r} "
                          f"(known: peer, role, {', '.join(LINK_SECTIONS)})")
    site = _table("[site]", data.get("site"))
    peer = entry.get("peer")
    if not isinstance(peer, str) or not peer:
        raise ConfigError(f"{path.name}: {where}: peer is required (the site at the other end of the link)")
    merged: dict[str, Any] = {
        "site": {"name": site.get("name", ""), "role": entry.get("role", ""), "peer": peer,
                 "data_dir": str(Path(str(site.get("data_dir", "."))) / "links" / peer)},
        "kms": data.get("kms"),
        "admin": data.get("admin"),
    }
    for section in LINK_SECTIONS:
        merged[section] = {**_table(f"[{section}]", data.get(section)),
                           **_table(f"{where} {section}", entry.get(section))}
    try:
        return parse_config(merged, path)
    except ConfigError as exc:
        raise ConfigError(f"{path.name}: {where} (peer {peer}): {str(exc).removeprefix(path.name + ': ')}") from None


def parse_site_config(data: dict[str, Any], path: Path) -> SiteConfig:
    """A parsed ``site.toml`` of either format (see the module docstring)."""
    if "links" not in data:
        return _single(parse_config(data, path))
    if "link" in data:
        raise ConfigError(f"{path.name}: a multi-link site has no top-level [link]; each [[links]] entry has its own")
    unknown = sorted(set(data) - set(SITE_SECTIONS))
    if unknown:
        raise ConfigError(f"{path.name}: unknown section [{unknown[0]}] (known: {', '.join(SITE_SECTIONS)})")
    site = _table("[site]", data.get("site"))
    for name in ("role", "peer"):
        if name in site:
            raise ConfigError(f"{path.name}: [site] {name} belongs in each [[links]] entry of a multi-link site")
    entries = data["links"]
    if not isinstance(entries, list) or not entries:
        raise ConfigError(f"{path.name}: [[links]] must list at least one link")
    try:
        network = load_section(NetworkSection, "network", data.get("network"))
    except ConfigError as exc:
        raise ConfigError(f"{path.name}: {exc}") from None
    links = tuple(_link_config(data, entry, i, path) for i, entry in enumerate(entries, 1))
    peers = [c.site.peer for c in links]
    for i, peer in enumerate(peers):
        if peer in peers[:i]:
            raise ConfigError(f"{path.name}: [[links]] entry {i + 1}: a second link to {peer}")
    config = SiteConfig(path=path, name=links[0].site.name, links=links, network=network,
                        data_dir_name=str(site.get("data_dir", ".")), peers=tuple(peers))
    _check_distinct_addresses(config)
    return config


def _single(config: NodeConfig) -> SiteConfig:
    return SiteConfig(path=config.path, name=config.site.name, links=(config,), data_dir_name=config.site.data_dir,
                      peers=(config.site.peer,))


def _check_distinct_addresses(config: SiteConfig) -> None:
    """No two listeners of the site (links, ETSI 014, SKIP, admin, network) on one address."""
    seen: dict[tuple[str, int], str] = {}
    assert config.network is not None
    candidates = [("network", "listen", config.network.listen)]
    for link in config.links:
        candidates += [(s if s != "link" else f"[[links]] peer {link.site.peer} link", n, a)
                       for s, n, a in listen_addresses(link)]
    for section, name, address in candidates:
        key = parse_address(section, name, address)
        label = f"{section} {name}" if section.startswith("[[") else f"[{section}] {name}"
        if key in seen and seen[key] != label:
            raise ConfigError(f"{config.path.name}: {label} ({address}) is also {seen[key]}: each listener needs "
                              "its own address")
        seen[key] = label


def load_site_config(path: str | Path, *, check_files: bool = True) -> SiteConfig:
    """Read and validate a ``site.toml`` of either format; ``check_files`` checks what it names on disk."""
    path = Path(path)
    data = read_toml(path)
    if "links" not in data:
        return _single(load_config(path, check_files=check_files))
    config = parse_site_config(data, path.resolve())
    if check_files:
        try:
            for link in config.links:
                check_files_of(link)
            _check_network_files(config)
        except ConfigError as exc:
            raise ConfigError(f"{path.name}: {exc}") from None
    return config


def _check_network_files(config: SiteConfig) -> None:
    """The topology parses and names this site; the network TLS files exist."""
    from qkdstack.network.topology import load_topology

    assert config.network is not None
    net = config.network
    for name in ("tls_cert", "tls_key", "ca_cert"):
        if not config.resolve(getattr(net, name)).is_file():
            raise field_error("network", name, f"names {config.resolve(getattr(net, name))}, which is not a file")
    topology = load_topology(config.resolve(net.topology))
    if config.name not in topology.sites:
        raise field_error("network", "topology", f"does not list this site ({config.name})")
    for link in config.links:
        if topology.link_between(config.name, link.site.peer) is None:
            raise field_error("network", "topology", f"has no link between {config.name} and {link.site.peer}")


def check_site_listen_addresses(config: SiteConfig) -> None:
    """Bind, and release at once, every address the site listens on (see ``check_listen_addresses``)."""
    for link in config.links:
        check_listen_addresses(link)
    if config.network is not None:
        check_bind("network", "listen", config.network.listen)

