"""Node configuration: one TOML file per site.

Sections (each field documented in docs/node.md):

- ``[site]``: this site's name, its role in the link (``transmitter`` holds Alice's
  source, ``receiver`` Bob's detectors), the peer's name, and the data directory
  (authentication pool, key store, certificates).
- ``[link]``: addresses of the classical link, the quantum channel and the KME
  peer link. The receiver listens, the transmitter connects.
- ``[device]``: the simulated device (same meaning as ``qkdstack simulate`` flags).
- ``[protocol]``: security parameters and tolerances of the post-processing.
- ``[auth]``: bootstrap mode (``psk``, ``pki``, ``pgp``) and its files.
- ``[kms]``: key store URL, key size, capacity marks, ETSI 014 listener and TLS files.

Relative paths are resolved against the configuration file's directory. Any error is one
sentence naming the section and field.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qkdstack.errors import ConfigError
from qkdstack.node.schema import field_error, load_section
from qkdstack.physics.params import ChannelParams, DeviceParams, ReceiverParams, SourceParams

ROLES = ("transmitter", "receiver")
BOOTSTRAPS = ("psk", "pki", "pgp")


def parse_address(section: str, name: str, value: str) -> tuple[str, int]:
    """``host:port`` → (host, port), with a one-sentence error naming the field."""
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) < 65536:
        raise field_error(section, name, f"must be HOST:PORT, got {value!r}")
    return host.strip("[]"), int(port)


@dataclass(frozen=True)
class SiteSection:
    name: str
    role: str
    peer: str
    data_dir: str = "."

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise field_error("site", "role", f"must be one of {', '.join(ROLES)}, got {self.role!r}")
        for attr in ("name", "peer"):
            value = getattr(self, attr)
            if not value or not value.replace("-", "").replace("_", "").isalnum():
                raise field_error("site", attr, f"must be a short name of letters, digits, '-' or '_', got {value!r}")
        if self.name == self.peer:
            raise field_error("site", "peer", "must differ from the site's own name")


@dataclass(frozen=True)
class LinkSection:
    classical: str = "127.0.0.1:7100"
    quantum: str = "127.0.0.1:7101"
    kms: str = "127.0.0.1:7102"
    timeout_s: float = 60.0

    def __post_init__(self) -> None:
        for name in ("classical", "quantum", "kms"):
            parse_address("link", name, getattr(self, name))
        if self.timeout_s <= 0:
            raise field_error("link", "timeout_s", f"must be > 0 seconds, got {self.timeout_s}")


_SOURCE, _CHANNEL, _RECEIVER = SourceParams(), ChannelParams(), ReceiverParams()

# physics parameter names (as qkdstack.physics.params reports them) → [device] field names
_DEVICE_FIELDS = {
    "length_km": "distance_km",
    "receiver p_z": "basis_prob_z",
    "p_z": "basis_prob_z",
    "efficiency": "detector_efficiency",
}


def _renamed(exc: ConfigError) -> ConfigError:
    """The physics layer's message ("NAME (what) must …") with NAME replaced by the [device] field's name."""
    message = str(exc)
    head, sep, rest = message.partition(" must ")
    name = head.split(" (")[0]
    if sep and name in _DEVICE_FIELDS:
        return field_error("device", _DEVICE_FIELDS[name], "must " + rest)
    return ConfigError(f"[device] {message}")


@dataclass(frozen=True)
class DeviceSection:
    """The simulated device; physical defaults are those of :mod:`qkdstack.physics.params`."""

    distance_km: float = _CHANNEL.length_km
    attenuation_db_per_km: float = _CHANNEL.attenuation_db_per_km
    extra_loss_db: float = _CHANNEL.extra_loss_db
    misalignment: float = _CHANNEL.misalignment
    rep_rate_hz: float = _SOURCE.rep_rate_hz
    intensities: list[float] = field(default_factory=lambda: list(_SOURCE.intensities))
    intensity_probs: list[float] = field(default_factory=lambda: list(_SOURCE.intensity_probs))
    basis_prob_z: float = _SOURCE.p_z
    detector_efficiency: float = _RECEIVER.efficiency
    dark_count: float = _RECEIVER.dark_count
    afterpulse: float = _RECEIVER.afterpulse
    dead_time_s: float = _RECEIVER.dead_time_s
    pulses_per_frame: int = 100_000_000
    eve: str = "none"
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.pulses_per_frame < 1000:
            raise field_error("device", "pulses_per_frame", f"must be at least 1000, got {self.pulses_per_frame}")
        try:
            self.params()  # validates every physical parameter
        except ConfigError as exc:
            raise _renamed(exc) from None

    def params(self) -> DeviceParams:
        return DeviceParams(
            source=SourceParams(self.rep_rate_hz, tuple(self.intensities), tuple(self.intensity_probs),
                                self.basis_prob_z),
            channel=ChannelParams(self.distance_km, self.attenuation_db_per_km, self.extra_loss_db, self.misalignment),
            receiver=ReceiverParams(self.basis_prob_z, self.detector_efficiency, self.dark_count, self.afterpulse,
                                    self.dead_time_s),
        )


@dataclass(frozen=True)
class ProtocolSection:
    eps_sec: float = 1e-10
    eps_cor: float = 1e-15
    max_qber: float = 0.11
    max_phase_error: float = 0.2
    cascade_schedule: str = "batched"
    rounds: int = 0
    """Rounds to run before stopping (0: run until stopped)."""

    def __post_init__(self) -> None:
        for name in ("eps_sec", "eps_cor"):
            value = getattr(self, name)
            if not 0 < value < 1:
                raise field_error("protocol", name, f"must lie in (0, 1), got {value}")
        for name in ("max_qber", "max_phase_error"):
            value = getattr(self, name)
            if not 0 < value <= 0.5:
                raise field_error("protocol", name, f"must lie in (0, 0.5], got {value}")
        if self.rounds < 0:
            raise field_error("protocol", "rounds", f"must be ≥ 0, got {self.rounds}")


@dataclass(frozen=True)
class AuthSection:
    bootstrap: str = "psk"
    psk_file: str = ""
    """psk: the pre-shared key file, identical at both sites."""
    ca_certs: str = ""
    """pki: the operator's root certificates (classical and ML-DSA-65), one PEM bundle."""
    crls: str = ""
    """pki: the CAs' certificate revocation lists, one PEM bundle."""
    classical_cert: str = ""
    """pki: this node's classical (Ed25519/ECDSA) certificate chain, leaf first."""
    classical_key: str = ""
    pq_cert: str = ""
    """pki: this node's ML-DSA-65 certificate chain, leaf first."""
    pq_key: str = ""
    gpg_home: str = ""
    """pgp: this node's GnuPG home with its key, its introducers' trust and the peer's key."""
    own_fingerprint: str = ""
    peer_fingerprint: str = ""
    """pgp: the OpenPGP key the peer must prove; it is accepted only if the web of trust makes it valid."""

    def __post_init__(self) -> None:
        if self.bootstrap not in BOOTSTRAPS:
            raise field_error("auth", "bootstrap", f"must be one of {', '.join(BOOTSTRAPS)}, got {self.bootstrap!r}")
        required = {
            "psk": ("psk_file",),
            "pki": ("ca_certs", "crls", "classical_cert", "classical_key", "pq_cert", "pq_key"),
            "pgp": ("gpg_home", "own_fingerprint", "peer_fingerprint"),
        }
        for name in required[self.bootstrap]:
            if not getattr(self, name):
                raise field_error("auth", name, f"is required with bootstrap = {self.bootstrap!r}")


@dataclass(frozen=True)
class KmsSection:
    store: str = "sqlite:///keys.db"
    key_size_bits: int = 256
    capacity_keys: int = 100_000
    low_water_keys: int = 1_000
    high_water_keys: int = 90_000
    etsi_listen: str = "127.0.0.1:8443"
    tls_cert: str = ""
    tls_key: str = ""
    ca_cert: str = ""
    sae_ids: list[str] = field(default_factory=list)
    """SAE IDs at this site (client certificate common names admitted to ETSI 014)."""
    local_socket: str = ""
    """Path of the in-unit delivery Unix socket (empty: disabled)."""
    local_users: list[str] = field(default_factory=list)
    """In-unit delivery: ``"UID:SAE_ID"`` entries, the local users admitted and the SAE each one is."""

    def __post_init__(self) -> None:
        if not (self.store.startswith("sqlite:///") or self.store.startswith(("postgresql://", "postgres://"))):
            raise field_error("kms", "store", f"must be sqlite:///PATH or postgresql://..., got {self.store!r}")
        if self.key_size_bits <= 0 or self.key_size_bits % 8:
            raise field_error("kms", "key_size_bits", f"must be a positive multiple of 8, got {self.key_size_bits}")
        if not 0 < self.low_water_keys < self.high_water_keys <= self.capacity_keys:
            raise field_error("kms", "high_water_keys",
                              "must satisfy 0 < low_water_keys < high_water_keys ≤ capacity_keys")
        parse_address("kms", "etsi_listen", self.etsi_listen)
        self.local_uid_map()

    def local_uid_map(self) -> dict[int, str]:
        """``local_users`` as {uid: SAE ID}."""
        out = {}
        for entry in self.local_users:
            uid, sep, sae = entry.partition(":")
            if not sep or not uid.isdigit() or not sae:
                raise field_error("kms", "local_users", f"entries must be UID:SAE_ID, got {entry!r}")
            out[int(uid)] = sae
        return out


@dataclass(frozen=True)
class NodeConfig:
    """A whole site's configuration, with paths resolved against the config file's folder."""

    path: Path
    site: SiteSection
    link: LinkSection
    device: DeviceSection
    protocol: ProtocolSection
    auth: AuthSection
    kms: KmsSection

    def resolve(self, relative: str) -> Path:
        """A path from the config, relative to the config file's folder unless absolute."""
        p = Path(relative).expanduser()
        return p if p.is_absolute() else (self.path.parent / p)

    @property
    def data_dir(self) -> Path:
        return self.resolve(self.site.data_dir)


SECTIONS = {
    "site": SiteSection,
    "link": LinkSection,
    "device": DeviceSection,
    "protocol": ProtocolSection,
    "auth": AuthSection,
    "kms": KmsSection,
}


def parse_config(data: dict[str, Any], path: Path) -> NodeConfig:
    unknown = sorted(set(data) - set(SECTIONS))
    if unknown:
        raise ConfigError(f"{path.name}: unknown section [{unknown[0]}] (known: {', '.join(SECTIONS)})")
    if "site" not in data:
        raise ConfigError(f"{path.name}: section [site] is required")
    try:
        sections = {name: load_section(cls, name, data.get(name)) for name, cls in SECTIONS.items()}
    except ConfigError as exc:
        raise ConfigError(f"{path.name}: {exc}") from None
    return NodeConfig(path=path, **sections)


def load_config(path: str | Path) -> NodeConfig:
    """Read and validate a node configuration file."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"configuration file {path} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path.name} is not valid TOML: {exc}") from None
    return parse_config(data, path.resolve())
