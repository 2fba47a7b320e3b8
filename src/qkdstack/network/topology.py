"""The network's topology: sites, the SAEs (key consumers) at each, and the QKD links between them.

A topology is a TOML file (docs/network.md, "Topology format")::

    [sites.A]
    sae = ["SAE_A"]          # key consumers at this site (optional; a relay site may have none)
    [sites.R1]
    [sites.B]
    sae = ["SAE_B"]

    [[links]]
    transmitter = "A"        # holds the source of this link
    receiver = "R1"          # holds the detectors
    distance_km = 20         # any [device] field of the node configuration

Every problem is a :class:`~qkdstack.errors.ConfigError` of one sentence that starts with the file and
names the entry (``topology.toml: [[links]] entry 2: receiver 'R9' is not a site``); the CLI turns it
into exit code 2.  The checks are those a deployment cannot live with: a link to an unknown site or to
itself, two links between the same two sites (in either direction: the KME store names a link by its
sorted ends, so two would share one key partition), an SAE ID at two sites (a key request could not be
routed), a network that is not connected (some SAEs could never share a key), and fields of the wrong
type or unknown fields (a typo must not silently fall back to a default).
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any
from urllib.parse import urlsplit

from qkdstack.errors import ConfigError
from qkdstack.node.schema import toml_value

SITE_FIELDS = ("sae", "kme_url", "host")
"""The fields of a ``[sites.NAME]`` table (all optional)."""

TOP_LEVEL_KEYS = ("sites", "links")


def _is_name(value: str) -> bool:
    return bool(value) and value.replace("-", "").replace("_", "").isalnum() and value.isascii()


@dataclass(frozen=True)
class SiteSpec:
    """One site: its name, the SAE IDs it serves, and the URL of its KME-to-KME listener."""

    name: str
    """Letters, digits, ``-`` and ``_``."""
    sae: tuple[str, ...] = ()
    """The SAE IDs at this site (a relay site may have none)."""
    kme_url: str = ""
    """``https://HOST:PORT`` of the site's KME-to-KME listener (``[network] listen``); empty in a user's
    topology file, filled in by ``qkdstack init`` in ``network.toml``."""
    host: str = ""
    """Optional: the address the site's listeners bind to and its peers connect to (an IP address or
    a DNS name). Empty means loopback, ``127.0.0.1``."""

    @property
    def address(self) -> str:
        """Where this site listens: :attr:`host`, or ``127.0.0.1`` when none is given."""
        return self.host or "127.0.0.1"


@dataclass(frozen=True)
class LinkSpec:
    """One QKD link: its two ends and the ``[device]`` fields that apply to it only."""

    transmitter: str
    receiver: str
    device: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}), hash=False)
    """Every other field of the ``[[links]]`` entry (``[device]`` fields: ``distance_km``, ...)."""

    @property
    def ends(self) -> tuple[str, str]:
        """``(transmitter, receiver)``."""
        return (self.transmitter, self.receiver)

    @property
    def link_id(self) -> str:
        """``"|".join(sorted(ends))``: the name of this link's partition in the KME store."""
        return "|".join(sorted(self.ends))

    def other(self, site: str) -> str:
        """The far end of this link seen from ``site``."""
        if site == self.transmitter:
            return self.receiver
        if site == self.receiver:
            return self.transmitter
        raise ValueError(f"site {site!r} is not an end of link {self.link_id!r}")

    def role_of(self, site: str) -> str:
        """``"transmitter"`` or ``"receiver"``: what ``site`` is on this link."""
        if site == self.transmitter:
            return "transmitter"
        if site == self.receiver:
            return "receiver"
        raise ValueError(f"site {site!r} is not an end of link {self.link_id!r}")


@dataclass(frozen=True)
class Topology:
    """Sites (by name, in file order) and links (in file order) of a validated network."""

    sites: Mapping[str, SiteSpec] = field(hash=False)
    links: tuple[LinkSpec, ...]

    def neighbours(self, site: str) -> list[str]:
        """The sites that share a link with ``site``, sorted."""
        return sorted(link.other(site) for link in self.links if site in link.ends)

    def link_between(self, a: str, b: str) -> LinkSpec | None:
        """The link joining ``a`` and ``b`` (either direction), or None."""
        for link in self.links:
            if set(link.ends) == {a, b} and a != b:
                return link
        return None

    def site_of_sae(self, sae: str) -> str | None:
        """The site that serves SAE ``sae``, or None."""
        for spec in self.sites.values():
            if sae in spec.sae:
                return spec.name
        return None

    def links_of(self, site: str) -> list[LinkSpec]:
        """The links with ``site`` at one end, in file order."""
        return [link for link in self.links if site in link.ends]

    def with_kme_urls(self, urls: Mapping[str, str]) -> Topology:
        """A copy with each named site's :attr:`SiteSpec.kme_url` replaced."""
        sites = {name: SiteSpec(spec.name, spec.sae, urls.get(name, spec.kme_url), spec.host)
                 for name, spec in self.sites.items()}
        return Topology(MappingProxyType(sites), self.links)

    def to_toml(self) -> str:
        """The topology as TOML in the format :func:`parse_topology` reads (``network.toml``)."""
        lines = ["# qkdstack network topology (docs/network.md)"]
        for spec in self.sites.values():
            lines.append(f"\n[sites.{spec.name}]")
            if spec.sae:
                lines.append(f"sae = {toml_value(list(spec.sae))}")
            if spec.kme_url:
                lines.append(f"kme_url = {toml_value(spec.kme_url)}")
            if spec.host:
                lines.append(f"host = {toml_value(spec.host)}")
        for link in self.links:
            lines.append("\n[[links]]")
            lines.append(f"transmitter = {toml_value(link.transmitter)}")
            lines.append(f"receiver = {toml_value(link.receiver)}")
            lines.extend(f"{key} = {toml_value(value)}" for key, value in link.device.items())
        return "\n".join(lines) + "\n"


def _device_fields() -> dict[str, Any]:
    # Imported late: node.config may one day import this module (the multi-link loader reads topologies).
    import dataclasses

    from qkdstack.node.config import DeviceSection

    return {f.name: f for f in dataclasses.fields(DeviceSection) if f.init}


def _check_device(where: str, values: dict[str, Any]) -> None:
    """The per-link fields must be ``[device]`` fields of the right type and range (node/config.py)."""
    from qkdstack.node.config import DeviceSection
    from qkdstack.node.schema import load_section

    fields = _device_fields()
    unknown = [key for key in values if key not in fields]
    if unknown:
        raise ConfigError(f"{where}: unknown field {unknown[0]!r} (a link has transmitter, receiver and "
                          f"[device] fields such as distance_km)")
    try:
        load_section(DeviceSection, "device", values)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None


def _check_host(where: str, host: str) -> None:
    if not host or any(c.isspace() or c in "/[]@?#" for c in host):
        raise ConfigError(f"{where}: host must be an IP address or a DNS name, got {host!r}")


def _check_kme_url(where: str, url: str) -> None:
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        port = None
        parts = None
    if parts is None or parts.scheme != "https" or not parts.hostname or port is None or parts.path not in ("", "/"):
        raise ConfigError(f"{where}: kme_url must be \"https://HOST:PORT\", got {url!r}")


def _parse_site(source: str, name: Any, data: Any) -> SiteSpec:
    where = f"{source}: [sites.{name}]"
    if not isinstance(name, str) or not _is_name(name):
        raise ConfigError(f"{where}: a site name must be letters, digits, '-' or '_', got {name!r}")
    if not isinstance(data, dict):
        raise ConfigError(f"{where} must be a table (write [sites.{name}] on its own line), got {data!r}")
    unknown = sorted(set(data) - set(SITE_FIELDS))
    if unknown:
        raise ConfigError(f"{where}: unknown field {unknown[0]!r} (known: {', '.join(SITE_FIELDS)})")
    sae = data.get("sae", [])
    if not isinstance(sae, list) or not all(isinstance(s, str) for s in sae):
        raise ConfigError(f"{where}: sae must be a list of SAE ID strings, got {sae!r}")
    for s in sae:
        if not s or not s.isprintable() or s.strip() != s or any(c in s for c in ":/,"):
            raise ConfigError(f"{where}: sae {s!r} is not a usable SAE ID (printable, no spaces at either end, "
                              f"no ':', '/' or ',')")
    from qkdstack.network.relay import RELAY_SAE  # imported here: the relay modules may come to import this one

    if RELAY_SAE in sae:
        raise ConfigError(f"{where}: sae {RELAY_SAE!r} is reserved for the key relay between KMEs; choose "
                          f"another SAE ID")
    if len(set(sae)) != len(sae):
        dup = next(s for s in sae if sae.count(s) > 1)
        raise ConfigError(f"{where}: sae lists {dup!r} twice")
    kme_url = data.get("kme_url", "")
    if not isinstance(kme_url, str):
        raise ConfigError(f"{where}: kme_url must be a string \"https://HOST:PORT\", got {kme_url!r}")
    if kme_url:
        _check_kme_url(where, kme_url)
    host = data.get("host", "")
    if not isinstance(host, str):
        raise ConfigError(f"{where}: host must be a string (an IP address or a DNS name), got {host!r}")
    if "host" in data:
        _check_host(where, host)
    return SiteSpec(name, tuple(sae), kme_url, host)


def _parse_link(source: str, index: int, data: Any, sites: Mapping[str, SiteSpec]) -> LinkSpec:
    where = f"{source}: [[links]] entry {index}"
    if not isinstance(data, dict):
        raise ConfigError(f"{where} must be a table with transmitter and receiver, got {data!r}")
    ends = []
    for role in ("transmitter", "receiver"):
        if role not in data:
            raise ConfigError(f"{where}: {role} is required (the name of a site)")
        value = data[role]
        if not isinstance(value, str):
            raise ConfigError(f"{where}: {role} must be a site name (a string), got {value!r}")
        if value not in sites:
            raise ConfigError(f"{where}: {role} {value!r} is not a site (sites: {', '.join(sites)})")
        ends.append(value)
    if ends[0] == ends[1]:
        raise ConfigError(f"{where}: site {ends[0]!r} is linked to itself")
    device = {k: v for k, v in data.items() if k not in ("transmitter", "receiver")}
    _check_device(where, device)
    return LinkSpec(ends[0], ends[1], MappingProxyType(device))


def parse_topology(data: dict[str, Any], source: str) -> Topology:
    """Validate a topology read from TOML (``source`` names it in errors: the file name)."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: a topology must be a table with [sites.NAME] tables and [[links]] entries")
    unknown = sorted(set(data) - set(TOP_LEVEL_KEYS))
    if unknown:
        raise ConfigError(f"{source}: unknown top-level key {unknown[0]!r} (a topology has [sites.NAME] tables "
                          f"and [[links]] entries)")
    raw_sites = data.get("sites")
    if not isinstance(raw_sites, dict):
        raise ConfigError(f"{source}: [sites] must be tables [sites.NAME], one per site, got {raw_sites!r}")
    sites: dict[str, SiteSpec] = {}
    owner: dict[str, str] = {}
    for name, site_data in raw_sites.items():
        spec = _parse_site(source, name, site_data)
        for sae in spec.sae:
            if sae in owner:
                raise ConfigError(f"{source}: [sites.{name}]: sae {sae!r} is already at site {owner[sae]!r} "
                                  f"(an SAE ID belongs to one site)")
            owner[sae] = name
        sites[name] = spec
    if len(sites) < 2:
        raise ConfigError(f"{source}: [sites] must name at least two sites, got {len(sites)}")
    raw_links = data.get("links")
    if not isinstance(raw_links, list):
        raise ConfigError(f"{source}: [[links]] must be an array of tables, one [[links]] entry per link, "
                          f"got {raw_links!r}")
    if not raw_links:
        raise ConfigError(f"{source}: [[links]] must give at least one link")
    links: list[LinkSpec] = []
    seen: dict[frozenset[str], int] = {}
    for index, link_data in enumerate(raw_links, start=1):
        link = _parse_link(source, index, link_data, sites)
        key = frozenset(link.ends)
        if key in seen:
            raise ConfigError(f"{source}: [[links]] entry {index}: {link.transmitter!r}–{link.receiver!r} "
                              f"duplicates entry {seen[key]} (one link per pair of sites, in either direction)")
        seen[key] = index
        links.append(link)
    topology = Topology(MappingProxyType(sites), tuple(links))
    _check_connected(source, topology)
    return topology


def _check_connected(source: str, topology: Topology) -> None:
    """Every site must be reachable from every other: else some SAEs could never share a key."""
    names = list(topology.sites)
    # Start from an SAE site so the error names a site whose SAEs are cut off from the others.
    start = next((n for n in names if topology.sites[n].sae), names[0])
    reached = {start}
    frontier = [start]
    while frontier:
        site = frontier.pop()
        for peer in topology.neighbours(site):
            if peer not in reached:
                reached.add(peer)
                frontier.append(peer)
    cut = [n for n in names if n not in reached]
    if not cut:
        return
    with_sae = [n for n in cut if topology.sites[n].sae]
    name = (with_sae or cut)[0]
    if with_sae and topology.sites[start].sae:
        consequence = (f"its SAEs ({', '.join(topology.sites[name].sae)}) can never share a key with "
                       f"those at {start!r}")
    else:
        consequence = "the network is not connected"
    raise ConfigError(f"{source}: [sites.{name}]: no chain of links joins it to site {start!r}, so {consequence}")


def load_topology(path: str | Path) -> Topology:
    """Read and validate a topology TOML file; :class:`ConfigError` on every problem."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such topology file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: the topology file cannot be read ({exc.__class__.__name__})") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path.name}: not valid TOML ({exc})") from None
    return parse_topology(data, path.name)
