"""Write a ready two-site deployment: configurations, trust anchors, keys and certificates.

``qkdstack init --sites A,B --out DIR`` (and ``qkdstack demo``) call :func:`write_deployment`:

``DIR/<site>/site.toml``
    the node configuration; the first site is the transmitter, the second the receiver.
``DIR/<site>/link.psk``
    (``psk``) the pre-shared key, identical at both sites, 0600. In a real deployment it is
    made once and carried to the other site out of band.
``DIR/<site>/tls/``
    the site CA (``ca.pem``) that signs the KME's server certificate (``kme.pem``/``kme.key``)
    and the key consumers' client certificates (``DIR/<site>/sae/<SAE_ID>.pem``/``.key``);
    an SAE's ID is its certificate's subject common name.
``DIR/<site>/sae/<SAE_ID>.psk`` and ``DIR/<site>/tls/skip.psk``
    SKIP TLS-PSK identities (``SAE_ID:HEXKEY``, 32 random bytes, 0600): the consumer's own line, and
    the site's list of them all (``[kms] skip_psk_file``). The PSK identity is the SAE ID.
``[kms] skip_listen``
    each site's SKIP key provider (kms/skip.py) on loopback: ``base_port + 8`` and ``+ 9``.
``DIR/<site>/pki/``
    (``pki``) the node's classical (Ed25519) and ML-DSA-65 certificate chains and keys, the two
    operator roots (``roots.pem``) and their CRLs (``crls.pem``). The operator CAs' keys stay in
    ``DIR/operator/`` and never go to a site.
``[admin] listen``
    each site's admin listener (metrics, dashboard) on loopback: ``base_port + 12`` and ``+ 13``.
``DIR/<site>/gnupg/``
    (``pgp``) the node's GnuPG home: its own key (ultimately trusted), the operator's key
    (an introducer with full owner trust) and the peer's key certified by the operator, so the
    web of trust makes the peer's key valid. The operator's GnuPG home is ``DIR/operator/gnupg``.

Every private key and secret file is created 0600 (:mod:`qkdstack.certs`).

``qkdstack init --topology FILE`` calls :func:`write_network_deployment` instead: every site of a
network topology (:mod:`qkdstack.network.topology`) gets a multi-link ``site.toml`` (one ``[[links]]``
entry per link), per-link bootstrap material under ``links/PEER/``, and a certificate from the network
CA for its KME-to-KME listener (docs/network.md, "What init writes").
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from pathlib import Path

from qkdstack import certs
from qkdstack.auth.psk import generate_psk_file
from qkdstack.errors import ConfigError
from qkdstack.network.topology import Topology
from qkdstack.node.config import BOOTSTRAPS, DeviceSection, is_loopback
from qkdstack.node.schema import load_section, toml_value


@dataclass(frozen=True)
class SiteLayout:
    """What :func:`write_deployment` made for one site."""

    name: str
    config: Path
    etsi_url: str
    sae_ids: tuple[str, ...]
    ca: Path
    admin_url: str = ""
    """The site's admin listener (``/metrics``, ``/`` dashboard), from ``[admin] listen``."""
    skip_address: str = ""
    """The site's SKIP key provider, ``HOST:PORT`` (``[kms] skip_listen``)."""
    kme_url: str = ""
    """Network deployments: the site KME's KME-to-KME listener, ``https://HOST:PORT`` (``[network] listen``)."""

    def sae_cert(self, sae_id: str) -> tuple[Path, Path]:
        folder = self.config.parent / "sae"
        return folder / f"{sae_id}.pem", folder / f"{sae_id}.key"

    def sae_psk(self, sae_id: str) -> Path:
        """The SAE's SKIP TLS-PSK file: one ``SAE_ID:HEXKEY`` line (identity and key, 0600)."""
        return self.config.parent / "sae" / f"{sae_id}.psk"


def render_toml(sections: dict[str, dict[str, object] | list[dict[str, object]]]) -> str:
    """TOML text of ``{section: {key: value}}``; None values are left out.

    A section whose value is a list of tables is written as an array of tables (``[[links]]``), and a
    table value inside one of its entries as that entry's sub-table (``[links.link]``), after its scalars.
    """
    lines = ["# qkdstack node configuration (written by `qkdstack init`; see docs/node.md)"]
    for section, values in sections.items():
        if isinstance(values, list):
            for entry in values:
                lines.append(f"\n[[{section}]]")
                lines.extend(f"{key} = {toml_value(value)}" for key, value in entry.items()
                             if value is not None and not isinstance(value, dict))
                for sub, table in entry.items():
                    if isinstance(table, dict):
                        lines.append(f"[{section}.{sub}]")
                        lines.extend(f"{key} = {toml_value(value)}" for key, value in table.items()
                                     if value is not None)
            continue
        lines.append(f"\n[{section}]")
        lines.extend(f"{key} = {toml_value(value)}" for key, value in values.items() if value is not None)
    return "\n".join(lines) + "\n"


def _host_names(hosts: tuple[str, ...]) -> tuple[list[str], list[str]]:
    """(DNS names, IP addresses) for a certificate's SAN: loopback plus ``hosts``."""
    import ipaddress

    dns, ips = ["localhost"], ["127.0.0.1"]
    for host in hosts:
        try:
            ip = str(ipaddress.ip_address(host))
        except ValueError:
            if host not in dns:
                dns.append(host)
        else:
            if ip not in ips:
                ips.append(ip)
    return dns, ips


def _write_tls(site_dir: Path, site: str, sae_ids: list[str], hosts: tuple[str, ...] = ()) -> None:
    tls = site_dir / "tls"
    tls.mkdir(parents=True, exist_ok=True)
    ca_cert, ca_key = certs.make_ca(f"qkdstack site {site} CA")
    certs.write_certificate(tls / "ca.pem", ca_cert)
    certs.write_private_key(tls / "ca.key", ca_key)
    kme_key = certs.generate_key("ec-p256")
    kme_cert = certs.issue_certificate(
        ca_cert, ca_key, f"KME_{site}", kme_key.public_key(), client=False, server=True,
        dns_names=_host_names(hosts)[0], ip_addresses=_host_names(hosts)[1],
    )
    certs.write_certificate(tls / "kme.pem", kme_cert)
    certs.write_private_key(tls / "kme.key", kme_key)
    sae_dir = site_dir / "sae"
    sae_dir.mkdir(exist_ok=True)
    for sae in sae_ids:
        key = certs.generate_key("ec-p256")
        cert = certs.issue_certificate(ca_cert, ca_key, sae, key.public_key(), client=True, server=False)
        certs.write_certificate(sae_dir / f"{sae}.pem", cert)
        certs.write_private_key(sae_dir / f"{sae}.key", key)


def _write_skip_psks(site_dir: Path, sae_ids: list[str]) -> None:
    """A fresh TLS-PSK per consumer for SKIP: ``sae/<SAE_ID>.psk`` (the consumer's), ``tls/skip.psk`` (the node's)."""
    from qkdstack.kms.skip import format_psk_line

    lines = []
    for sae in sae_ids:
        line = format_psk_line(sae, secrets.token_bytes(32))
        certs.atomic_write(site_dir / "sae" / f"{sae}.psk", line.encode(), 0o600)
        lines.append(line)
    certs.atomic_write(site_dir / "tls" / "skip.psk", "".join(lines).encode(), 0o600)


def _write_pki(out: Path, sites: list[str]) -> None:
    operator = out / "operator" / "pki"
    operator.mkdir(parents=True, exist_ok=True)
    roots = {}
    for kind, label in (("ed25519", "classical"), ("ml-dsa-65", "mldsa")):
        cert, key = certs.make_ca(f"qkdstack operator {label} root", key_kind=kind)
        certs.write_certificate(operator / f"{label}-root.pem", cert)
        certs.write_private_key(operator / f"{label}-root.key", key)
        roots[label] = (cert, key)
    crls = [certs.make_crl(cert, key, []) for cert, key in roots.values()]
    for site in sites:
        folder = out / site / "pki"
        folder.mkdir(parents=True, exist_ok=True)
        certs.write_certificate(folder / "roots.pem", [cert for cert, _ in roots.values()])
        certs.write_crl(folder / "crls.pem", crls)
        for kind, label in (("ed25519", "classical"), ("ml-dsa-65", "mldsa")):
            ca_cert, ca_key = roots[label]
            key = certs.generate_key(kind)
            cert = certs.issue_certificate(ca_cert, ca_key, site, key.public_key(), client=False, server=False,
                                           signing=True)
            certs.write_certificate(folder / f"{label}.pem", cert)
            certs.write_private_key(folder / f"{label}.key", key)


def _write_pgp(out: Path, sites: list[str]) -> dict[str, str]:
    """GnuPG homes: each site trusts the operator, who certified every site key. Returns fingerprints."""
    from qkdstack.auth.pgp import GpgKeyring

    operator = GpgKeyring(out / "operator" / "gnupg")
    rings = {site: GpgKeyring(out / site / "gnupg") for site in sites}
    try:
        op_fpr = operator.generate_key("qkdstack operator <operator@qkdstack.invalid>")
        fprs = {site: ring.generate_key(f"qkdstack node {site} <{site.lower()}@qkdstack.invalid>")
                for site, ring in rings.items()}
        for site, ring in rings.items():
            operator.import_keys(ring.export_public(fprs[site]))
            operator.certify(op_fpr, fprs[site])
        op_public = operator.export_public(op_fpr)
        for site, ring in rings.items():
            ring.import_keys(op_public)
            # An introducer's owner trust counts only once its key is valid: the site vouches for it.
            ring.certify(fprs[site], op_fpr)
            ring.set_owner_trust(op_fpr, "full")
            for other in sites:
                if other != site:
                    ring.import_keys(operator.export_public(fprs[other]))
            ring._run("--check-trustdb", check=False)
        return fprs
    finally:
        operator.close()
        for ring in rings.values():
            ring.close()


def default_frame_pulses(distance_km: float) -> int:
    """Pulses per round for the default device at ``distance_km``: enough for a finite key with margin, and
    at least 0.4 s of device time (:func:`qkdstack.theory.frames.frame_pulses`)."""
    from dataclasses import replace

    from qkdstack.physics.params import DeviceParams
    from qkdstack.theory.frames import frame_pulses

    params = DeviceParams()
    return frame_pulses(replace(params, channel=replace(params.channel, length_km=float(distance_km))))


def write_deployment(
    out: str | Path,
    sites: list[str],
    *,
    bootstrap: str = "psk",
    base_port: int = 7100,
    distance_km: float = 25.0,
    pulses_per_frame: int | None = None,
    rounds: int = 0,
    eve: str = "none",
    seed: int | None = None,
    store: str = "sqlite:///data/keys.db",
    sae_ids: dict[str, list[str]] | None = None,
) -> dict[str, SiteLayout]:
    """Write the two sites' files under ``out``; returns what was made per site.

    ``pulses_per_frame=None`` follows the distance (:func:`default_frame_pulses`).
    """
    if len(sites) != 2 or sites[0] == sites[1]:
        raise ConfigError("--sites must name exactly two different sites, e.g. A,B")
    if bootstrap not in BOOTSTRAPS:
        raise ConfigError(f"--bootstrap must be one of {', '.join(BOOTSTRAPS)}, got {bootstrap!r}")
    if pulses_per_frame is None:
        pulses_per_frame = default_frame_pulses(distance_km)
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"--out {out} exists and is not empty; choose a new folder")
    out.mkdir(parents=True, exist_ok=True)
    sae_ids = sae_ids or {site: [f"SAE_{site}"] for site in sites}
    link_id = "-".join(sorted(sites))
    psk_secret = None
    if bootstrap == "psk":
        psk_path = out / sites[0] / "link.psk"
        psk_path.parent.mkdir(parents=True, exist_ok=True)
        generate_psk_file(psk_path, link_id=link_id)
        psk_secret = psk_path.read_bytes()
    if bootstrap == "pki":
        _write_pki(out, sites)
    fprs = _write_pgp(out, sites) if bootstrap == "pgp" else {}
    layouts = {}
    for i, site in enumerate(sites):
        peer = sites[1 - i]
        site_dir = out / site
        site_dir.mkdir(parents=True, exist_ok=True)
        _write_tls(site_dir, site, sae_ids[site])
        _write_skip_psks(site_dir, sae_ids[site])
        if psk_secret is not None and i == 1:
            certs.atomic_write(site_dir / "link.psk", psk_secret, 0o600)
        auth: dict[str, object] = {"bootstrap": bootstrap}
        if bootstrap == "psk":
            auth["psk_file"] = "link.psk"
        elif bootstrap == "pki":
            auth |= {"ca_certs": "pki/roots.pem", "crls": "pki/crls.pem", "classical_cert": "pki/classical.pem",
                     "classical_key": "pki/classical.key", "pq_cert": "pki/mldsa.pem", "pq_key": "pki/mldsa.key"}
        else:
            auth |= {"gpg_home": "gnupg", "own_fingerprint": fprs[site], "peer_fingerprint": fprs[peer]}
        etsi_port = base_port + 10 + i
        config = {
            "site": {"name": site, "role": "transmitter" if i == 0 else "receiver", "peer": peer, "data_dir": "data"},
            "link": {"classical": f"127.0.0.1:{base_port}", "quantum": f"127.0.0.1:{base_port + 1}",
                     "kms": f"127.0.0.1:{base_port + 2}"},
            "device": {"distance_km": distance_km, "pulses_per_frame": pulses_per_frame, "eve": eve,
                       "seed": None if seed is None else seed + 7 * i},
            "protocol": {"rounds": rounds},
            "auth": auth,
            "kms": {"store": store, "etsi_listen": f"127.0.0.1:{etsi_port}", "tls_cert": "tls/kme.pem",
                    "tls_key": "tls/kme.key", "ca_cert": "tls/ca.pem", "sae_ids": sae_ids[site],
                    "skip_listen": f"127.0.0.1:{base_port + 8 + i}", "skip_psk_file": "tls/skip.psk"},
            "admin": {"listen": f"127.0.0.1:{base_port + 12 + i}"},
        }
        path = site_dir / "site.toml"
        path.write_text(render_toml(config))
        layouts[site] = SiteLayout(site, path, f"https://127.0.0.1:{etsi_port}", tuple(sae_ids[site]),
                                   site_dir / "tls" / "ca.pem", f"http://127.0.0.1:{base_port + 12 + i}",
                                   f"127.0.0.1:{base_port + 8 + i}")
    (out / "README.txt").write_text(_readme(sites, layouts, bootstrap))
    return layouts


def _readme(sites: list[str], layouts: dict[str, SiteLayout], bootstrap: str) -> str:
    a, b = sites
    sa, sb = layouts[a].sae_ids[0], layouts[b].sae_ids[0]
    cert, key = layouts[a].sae_cert(sa)
    return f"""qkdstack two-site deployment ({bootstrap} bootstrap), written by `qkdstack init`.

Start the sites (two terminals):
  qkdstack node --config {layouts[a].config}
  qkdstack node --config {layouts[b].config}

Watch them (metrics, live dashboard; loopback only):
  {layouts[a].admin_url}/  and  {layouts[b].admin_url}/
  qkdstack dashboard --deployment {layouts[a].config.parent.parent}

Fetch a key at site {a} as {sa}, for {sb} at site {b}:
  curl --cert {cert} --key {key} --cacert {layouts[a].ca} \\
       '{layouts[a].etsi_url}/api/v1/keys/{sb}/enc_keys?number=1&size=256'
Then at site {b} as {sb}, by its key_ID:
  curl --cert {layouts[b].sae_cert(sb)[0]} --key {layouts[b].sae_cert(sb)[1]} --cacert {layouts[b].ca} \\
       '{layouts[b].etsi_url}/api/v1/keys/{sa}/dec_keys?key_ID=KEY_ID'

The same keys over SKIP (draft-cisco-skip; docs/kms.md), e.g. with the PyPI client skip-qkd:
  a = SkipQKDClient("{layouts[a].skip_address}", "{sa}", mtls_config=MTLSConfig("{layouts[a].ca}", "{cert}", "{key}"))
  a.request_key("{sb}")  ->  {{"keyId": ..., "key": ...}}
  (new client object per call) at site {b} ({layouts[b].skip_address}) as {sb}: fetch_key_by_id(KEY_ID, "{sa}")
TLS-PSK instead of certificates: identity and key in {layouts[a].sae_psk(sa)}.
"""


# --------------------------------------------------------------------------------------------
# A network of sites (qkdstack init --topology; docs/network.md)

PORTS_PER_LINK = 3
"""classical, quantum, kms: the receiver's listeners of one link."""
PORTS_PER_SITE = 4
"""[network] listen, [kms] etsi_listen, [kms] skip_listen (unused at a site without SAEs), [admin] listen."""


def network_ports(topology: Topology, base_port: int) -> tuple[dict[str, dict[str, int]], dict[str, dict[str, int]]]:
    """The listening ports of a topology's deployment: ``(per link_id, per site)``, all distinct.

    Links first, in file order (``base_port + 3i``: classical, quantum, kms), then sites in file order
    (``base_port + 3L + 4j``: network, etsi, skip, admin). Raises :class:`ConfigError` naming
    ``--base-port`` when the last port would pass 65535.
    """
    n_links, n_sites = len(topology.links), len(topology.sites)
    last = base_port + PORTS_PER_LINK * n_links + PORTS_PER_SITE * n_sites - 1
    if base_port < 1 or last > 65535:
        raise ConfigError(f"--base-port must lie in 1..{65535 - (last - base_port)} (this topology's deployment "
                          f"uses it and the next {last - base_port} ports), got {base_port}")
    links = {}
    for i, link in enumerate(topology.links):
        port = base_port + PORTS_PER_LINK * i
        links[link.link_id] = {"classical": port, "quantum": port + 1, "kms": port + 2}
    sites = {}
    for j, name in enumerate(topology.sites):
        port = base_port + PORTS_PER_LINK * n_links + PORTS_PER_SITE * j
        sites[name] = {"network": port, "etsi": port + 1, "skip": port + 2, "admin": port + 3}
    return links, sites


def _hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _link_device(topology: Topology, index: int, distance_km: float, pulses_per_frame: int | None) -> dict[str, object]:
    """The ``[links.device]`` table of link ``index``: its topology fields, the default distance, and a frame
    size that follows the link's own device unless the topology gives one (:func:`frame_pulses`)."""
    from qkdstack.theory.frames import frame_pulses

    link = topology.links[index]
    device: dict[str, object] = {"distance_km": distance_km, **link.device}
    host = topology.sites[link.receiver].address
    if device.get("source", "simulator") == "simulator" and not device.get("simulation_testbed") \
            and not is_loopback(host):
        # The node refuses this too ([link] quantum); refused here, before anything is written.
        raise ConfigError(f"[[links]] entry {index + 1} ({link.transmitter}–{link.receiver}): the receiver's host "
                          f"{host} is not loopback, and the simulated quantum channel carries the raw key in "
                          f"clear: set simulation_testbed = true in this entry to declare a test bed whose keys "
                          f"need not be secret")
    if "pulses_per_frame" not in device and "frame_seconds" not in device:
        if pulses_per_frame is not None:
            device["pulses_per_frame"] = pulses_per_frame
        elif device.get("source", "simulator") == "simulator":
            try:
                device["pulses_per_frame"] = frame_pulses(load_section(DeviceSection, "device", device).params())
            except ConfigError as exc:
                raise ConfigError(f"[[links]] entry {index + 1} ({link.transmitter}–{link.receiver}): "
                                  f"{exc}") from None
    return device


def _write_network_pki(out: Path, topology: Topology) -> None:
    """The network CA (``out/network-ca``; its key stays there) and each site KME's mutual-TLS certificate
    (``out/SITE/network/``: ``ca.pem``, ``kme.pem``, ``kme.key``; CN ``KME_<SITE>``, client and server)."""
    ca_dir = out / "network-ca"
    ca_dir.mkdir(parents=True, exist_ok=True)
    ca_cert, ca_key = certs.make_ca("qkdstack network CA")
    certs.write_certificate(ca_dir / "ca.pem", ca_cert)
    certs.write_private_key(ca_dir / "ca.key", ca_key)
    for name, spec in topology.sites.items():
        folder = out / name / "network"
        folder.mkdir(parents=True, exist_ok=True)
        dns, ips = _host_names((spec.host,) if spec.host else ())
        key = certs.generate_key("ec-p256")
        cert = certs.issue_certificate(ca_cert, ca_key, f"KME_{name}", key.public_key(), client=True, server=True,
                                       dns_names=dns, ip_addresses=ips)
        certs.write_certificate(folder / "ca.pem", ca_cert)
        certs.write_certificate(folder / "kme.pem", cert)
        certs.write_private_key(folder / "kme.key", key)


def write_network_deployment(
    topology: Topology,
    out: str | Path,
    *,
    bootstrap: str = "psk",
    base_port: int = 7100,
    store: str = "sqlite:///data/keys.db",
    distance_km: float = 25.0,
    pulses_per_frame: int | None = None,
    rounds: int = 0,
) -> dict[str, SiteLayout]:
    """Write a deployment of every site of ``topology`` under ``out``; returns what was made per site.

    Per site ``out/SITE/``: ``site.toml`` in the multi-link format (one ``[[links]]`` entry per link of
    the site), ``network.toml`` (the topology with every site's ``kme_url``), ``network/`` (mutual-TLS
    certificate of the site's KME, from the network CA in ``out/network-ca``), ``tls/`` and ``sae/`` as
    :func:`write_deployment` writes them, and per link ``links/PEER/link.psk`` (psk bootstrap; the same
    fresh key at both ends of a link, a different one per link). ``pki`` gives every site one identity
    (CN = site name, as the two-site writer) that serves all its links; ``pgp`` gives every site a GnuPG
    home holding every other site's key certified by the operator. ``distance_km`` and
    ``pulses_per_frame`` are the defaults of links that give none; ports are :func:`network_ports`.
    """
    if bootstrap not in BOOTSTRAPS:
        raise ConfigError(f"--bootstrap must be one of {', '.join(BOOTSTRAPS)}, got {bootstrap!r}")
    link_ports, site_ports = network_ports(topology, base_port)
    devices = [_link_device(topology, i, distance_km, pulses_per_frame) for i in range(len(topology.links))]
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"--out {out} exists and is not empty; choose a new folder")
    out.mkdir(parents=True, exist_ok=True)
    names = list(topology.sites)
    kme_urls = {name: "https://" + _hostport(topology.sites[name].address, site_ports[name]["network"])
                for name in names}
    topology = topology.with_kme_urls(kme_urls)
    network_toml = topology.to_toml()
    (out / "network.toml").write_text(network_toml)
    _write_network_pki(out, topology)

    if bootstrap == "psk":
        for link in topology.links:
            tx = out / link.transmitter / "links" / link.receiver / "link.psk"
            tx.parent.mkdir(parents=True, exist_ok=True)
            # The node names a link's pool by its sorted ends joined with '-' (node/service.py).
            generate_psk_file(tx, link_id="-".join(sorted(link.ends)))
            rx = out / link.receiver / "links" / link.transmitter / "link.psk"
            rx.parent.mkdir(parents=True, exist_ok=True)
            certs.atomic_write(rx, tx.read_bytes(), 0o600)
    elif bootstrap == "pki":
        _write_pki(out, names)
    fprs = _write_pgp(out, names) if bootstrap == "pgp" else {}

    layouts = {}
    for name, spec in topology.sites.items():
        site_dir = out / name
        site_dir.mkdir(parents=True, exist_ok=True)
        host = spec.address
        ports = site_ports[name]
        sae_ids = list(spec.sae)
        _write_tls(site_dir, name, sae_ids, (spec.host,) if spec.host else ())
        kms: dict[str, object] = {
            "store": store, "etsi_listen": _hostport(host, ports["etsi"]), "tls_cert": "tls/kme.pem",
            "tls_key": "tls/kme.key", "ca_cert": "tls/ca.pem", "sae_ids": sae_ids,
        }
        if sae_ids:  # SKIP serves SAEs; an empty TLS-PSK list is refused, so a pure relay site has no SKIP
            _write_skip_psks(site_dir, sae_ids)
            kms |= {"skip_listen": _hostport(host, ports["skip"]), "skip_psk_file": "tls/skip.psk"}
        (site_dir / "network.toml").write_text(network_toml)
        auth: dict[str, object] = {"bootstrap": bootstrap}
        if bootstrap == "pki":
            auth |= {"ca_certs": "pki/roots.pem", "crls": "pki/crls.pem", "classical_cert": "pki/classical.pem",
                     "classical_key": "pki/classical.key", "pq_cert": "pki/mldsa.pem", "pq_key": "pki/mldsa.key"}
        elif bootstrap == "pgp":
            auth |= {"gpg_home": "gnupg", "own_fingerprint": fprs[name]}
        entries: list[dict[str, object]] = []
        for index, link in enumerate(topology.links):
            if name not in link.ends:
                continue
            peer = link.other(name)
            ports_of_link = link_ports[link.link_id]
            listen_host = topology.sites[link.receiver].address  # the receiver listens; the transmitter connects
            link_auth: dict[str, object] = {}
            if bootstrap == "psk":
                link_auth["psk_file"] = f"links/{peer}/link.psk"
            elif bootstrap == "pgp":
                link_auth["peer_fingerprint"] = fprs[peer]
            entries.append({
                "peer": peer,
                "role": link.role_of(name),
                "link": {key: _hostport(listen_host, port) for key, port in ports_of_link.items()},
                "device": dict(devices[index]),
                "auth": link_auth or None,
            })
        config: dict[str, dict[str, object] | list[dict[str, object]]] = {
            "site": {"name": name, "data_dir": "data"},
            "kms": kms,
            # The admin listener serves figures without TLS: it stays on loopback whatever the site's host.
            "admin": {"listen": f"127.0.0.1:{ports['admin']}"},
            "protocol": {"rounds": rounds},
            "auth": auth,
            "network": {"listen": _hostport(host, ports["network"]), "topology": "network.toml",
                        "tls_cert": "network/kme.pem", "tls_key": "network/kme.key", "ca_cert": "network/ca.pem"},
            "links": [{k: v for k, v in entry.items() if v is not None} for entry in entries],
        }
        path = site_dir / "site.toml"
        path.write_text(render_toml(config))
        layouts[name] = SiteLayout(
            name, path, "https://" + _hostport(host, ports["etsi"]), tuple(sae_ids), site_dir / "tls" / "ca.pem",
            f"http://127.0.0.1:{ports['admin']}", _hostport(host, ports["skip"]) if sae_ids else "",
            kme_urls[name],
        )
    (out / "README.txt").write_text(_network_readme(topology, layouts, bootstrap))
    return layouts


def most_distant_sae_sites(topology: Topology) -> tuple[str, str] | None:
    """The two sites with SAEs that are the most hops apart (first in file order on ties), or None."""
    with_sae = [n for n, s in topology.sites.items() if s.sae]
    best: tuple[int, str, str] | None = None
    for a in with_sae:
        hops = {a: 0}
        frontier = [a]
        while frontier:
            nxt = []
            for site in frontier:
                for peer in topology.neighbours(site):
                    if peer not in hops:
                        hops[peer] = hops[site] + 1
                        nxt.append(peer)
            frontier = nxt
        for b in with_sae:
            if b != a and (best is None or hops[b] > best[0]):
                best = (hops[b], a, b)
    return None if best is None else (best[1], best[2])


def _network_readme(topology: Topology, layouts: dict[str, SiteLayout], bootstrap: str) -> str:
    starts = "\n".join(f"  qkdstack node --config {layout.config}" for layout in layouts.values())
    links = "\n".join(f"  {link.transmitter} -> {link.receiver}" for link in topology.links)
    text = f"""qkdstack network deployment ({len(layouts)} sites, {len(topology.links)} links, {bootstrap} bootstrap),
written by `qkdstack init --topology` (docs/network.md).

Links (transmitter -> receiver):
{links}

Start every site (one terminal each):
{starts}
"""
    pair = most_distant_sae_sites(topology)
    if pair is not None:
        a, b = (layouts[n] for n in pair)
        sa, sb = a.sae_ids[0], b.sae_ids[0]
        cert, key = a.sae_cert(sa)
        text += f"""
Fetch a key at site {a.name} as {sa}, for {sb} at site {b.name} (relayed through the trusted nodes between):
  curl --cert {cert} --key {key} --cacert {a.ca} \\
       '{a.etsi_url}/api/v1/keys/{sb}/enc_keys?number=1&size=256'
Then at site {b.name} as {sb}, by its key_ID:
  curl --cert {b.sae_cert(sb)[0]} --key {b.sae_cert(sb)[1]} --cacert {b.ca} \\
       '{b.etsi_url}/api/v1/keys/{sa}/dec_keys?key_ID=KEY_ID'
"""
    return text
