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
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from pathlib import Path

from qkdstack import certs
from qkdstack.auth.psk import generate_psk_file
from qkdstack.errors import ConfigError
from qkdstack.node.config import BOOTSTRAPS


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

    def sae_cert(self, sae_id: str) -> tuple[Path, Path]:
        folder = self.config.parent / "sae"
        return folder / f"{sae_id}.pem", folder / f"{sae_id}.key"

    def sae_psk(self, sae_id: str) -> Path:
        """The SAE's SKIP TLS-PSK file: one ``SAE_ID:HEXKEY`` line (identity and key, 0600)."""
        return self.config.parent / "sae" / f"{sae_id}.psk"


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return repr(value)


def render_toml(sections: dict[str, dict[str, object]]) -> str:
    lines = ["# qkdstack node configuration (written by `qkdstack init`; see docs/node.md)"]
    for section, values in sections.items():
        lines.append(f"\n[{section}]")
        lines.extend(f"{key} = {_toml_value(value)}" for key, value in values.items() if value is not None)
    return "\n".join(lines) + "\n"


def _write_tls(site_dir: Path, site: str, sae_ids: list[str]) -> None:
    tls = site_dir / "tls"
    tls.mkdir(parents=True, exist_ok=True)
    ca_cert, ca_key = certs.make_ca(f"qkdstack site {site} CA")
    certs.write_certificate(tls / "ca.pem", ca_cert)
    certs.write_private_key(tls / "ca.key", ca_key)
    kme_key = certs.generate_key("ec-p256")
    kme_cert = certs.issue_certificate(
        ca_cert, ca_key, f"KME_{site}", kme_key.public_key(), client=False, server=True,
        dns_names=["localhost"], ip_addresses=["127.0.0.1"],
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
