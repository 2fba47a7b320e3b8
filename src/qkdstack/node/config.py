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
- ``[kms]``: key store URL, key size, capacity marks, ETSI 014 and SKIP listeners and TLS files.
- ``[admin]``: the admin HTTP listener (metrics, dashboard, status) and its bearer token
  (docs/operations.md).

Relative paths are resolved against the configuration file's directory. Any error is one
sentence naming the section and field.

:func:`load_config` also checks what the files name, so that ``qkdstack node`` fails before
anything starts: the data directory and the SQLite store can be made, and the ETSI 014 TLS
material loads (certificate chain and key, which must match, into an :class:`ssl.SSLContext`, and
the CA). :func:`check_listen_addresses` binds, and releases at once, every address the node will
listen on. The simulated quantum channel carries every arriving photon's number, basis and bit in
clear, so ``[link] quantum`` must be a loopback address unless ``[device] simulation_testbed``
says the deployment is a test bed whose keys need not be secret.
"""

from __future__ import annotations

import errno
import ipaddress
import math
import os
import socket
import ssl
import stat
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from qkdstack.errors import ConfigError
from qkdstack.node.schema import field_error, load_section
from qkdstack.physics.eve import parse_eve
from qkdstack.physics.params import ChannelParams, DeviceParams, ReceiverParams, SourceParams

ROLES = ("transmitter", "receiver")
BOOTSTRAPS = ("psk", "pki", "pgp")


def parse_address(section: str, name: str, value: str) -> tuple[str, int]:
    """``host:port`` → (host, port), with a one-sentence error naming the field."""
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) < 65536:
        raise field_error(section, name, f"must be HOST:PORT, got {value!r}")
    return host.strip("[]"), int(port)


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and IP literals in 127.0.0.0/8 or ``::1``.

    Names other than ``localhost`` count as not loopback: what a name resolves to can change after
    the configuration was checked, and ``0.0.0.0`` (every interface) is not loopback either.
    """
    if host.lower() in ("localhost", "localhost.", "ip6-localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


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
        seen: dict[tuple[str, int], str] = {}
        for name in ("classical", "quantum", "kms"):
            address = parse_address("link", name, getattr(self, name))
            if address in seen:
                raise field_error("link", name, f"must differ from [link] {seen[address]} (both "
                                  f"{getattr(self, name)}): the receiver listens on each")
            seen[address] = name
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
    pulses_per_frame: int | None = None
    """Pulses per round; default 100_000_000 unless ``frame_seconds`` is given (exactly one of the two)."""
    frame_seconds: float | None = None
    """Device time per round: ``frame_seconds × rep_rate_hz`` pulses (an integer), instead of ``pulses_per_frame``."""
    source: str = "simulator"
    """Where frames come from: ``simulator`` (the split simulated device) or ``records`` (docs/devices.md)."""
    records_dir: str = ""
    """With ``source = "records"``: the folder holding ``alice/`` and ``bob/`` frame files."""
    eve: str = "none"
    seed: int | None = None
    simulation_testbed: bool = False
    """True declares a simulation test bed: ``[link] quantum`` may then leave loopback, although anyone
    who can read that connection (photon number, basis and bit of every arriving pulse, in clear) reads
    the raw key. False (default): a non-loopback quantum address is a configuration error."""

    @property
    def simulated(self) -> bool:
        """Whether keys come from the simulated device (its light crosses the quantum-channel connection)."""
        return self.source == "simulator"

    @property
    def seeded(self) -> bool:
        """Whether the simulation is seeded: the transmitter's ``seed`` makes Alice's bits a reproducible PCG64
        stream, so anyone who knows it can recompute them (each site knows only its own seed)."""
        return self.seed is not None

    def __post_init__(self) -> None:
        if self.frame_seconds is not None:
            if self.pulses_per_frame is not None:
                raise field_error("device", "frame_seconds", "and pulses_per_frame are alternatives: give exactly "
                                  "one of the two")
            pulses = self.frame_seconds * self.rep_rate_hz
            if not (math.isfinite(pulses) and pulses >= 1000):
                raise field_error("device", "frame_seconds", f"must give at least 1000 pulses at rep_rate_hz "
                                  f"{self.rep_rate_hz:g}, got {self.frame_seconds!r} s")
            if abs(pulses - round(pulses)) > max(1e-6, 4e-16 * pulses) or round(pulses) >= 2**62:
                raise field_error("device", "frame_seconds", f"× rep_rate_hz must be a whole number of pulses, got "
                                  f"{self.frame_seconds!r} s × {self.rep_rate_hz:g} Hz = {pulses!r}")
            object.__setattr__(self, "pulses_per_frame", round(pulses))
        elif self.pulses_per_frame is None:
            object.__setattr__(self, "pulses_per_frame", 100_000_000)
        if self.pulses_per_frame < 1000:
            raise field_error("device", "pulses_per_frame", f"must be at least 1000, got {self.pulses_per_frame}")
        if self.source not in ("simulator", "records"):
            raise field_error("device", "source", f"must be \"simulator\" or \"records\", got {self.source!r}")
        if self.source == "records" and not self.records_dir:
            raise field_error("device", "records_dir", "is required with source = \"records\" (the folder of "
                              "alice/ and bob/ frame files)")
        try:
            self.params()  # validates every physical parameter
        except ConfigError as exc:
            raise _renamed(exc) from None
        parse_eve(self.eve, "[device] eve")  # used by the transmitter only, but checked at both sites
        if self.seed is not None and self.seed < 0:  # numpy's generators take seeds ≥ 0 (a traceback at start)
            raise field_error("device", "seed", f"must be a whole number ≥ 0, got {self.seed}")

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
    reconciliation: str = "cascade"
    """``cascade`` or ``ldpc`` (docs/ldpc.md); both sites must agree (checked at ``round.start``)."""
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
        if self.reconciliation not in ("cascade", "ldpc"):
            raise field_error("protocol", "reconciliation", f"must be \"cascade\" or \"ldpc\", got "
                              f"{self.reconciliation!r}")


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
    crl: str = ""
    """Certificate revocation list of the SAE CA (PEM or DER; empty: no revocation check); revoked SAEs fail TLS."""
    sae_ids: list[str] = field(default_factory=list)
    """SAE IDs at this site (client certificate common names admitted to ETSI 014)."""
    local_socket: str = ""
    """Path of the in-unit delivery Unix socket (empty: disabled)."""
    local_users: list[str] = field(default_factory=list)
    """In-unit delivery: ``"UID:SAE_ID"`` entries, the local users admitted and the SAE each one is."""
    skip_listen: str = ""
    """``HOST:PORT`` of the SKIP key provider (draft-cisco-skip; kms/skip.py); empty: no SKIP server."""
    skip_psk_file: str = ""
    """SKIP TLS-PSK identities, ``SAE_ID:HEXKEY`` lines (0600); empty: SKIP takes client certificates only."""

    def __post_init__(self) -> None:
        if self.tls_cert or self.tls_key or self.ca_cert:
            for name in ("tls_cert", "tls_key", "ca_cert"):
                if not getattr(self, name):
                    raise field_error("kms", name, "is required when any of tls_cert, tls_key, ca_cert is set "
                                      "(the ETSI 014 server needs all three)")
        if not (self.store.startswith("sqlite:///") or self.store.startswith(("postgresql://", "postgres://"))):
            raise field_error("kms", "store", f"must be sqlite:///PATH or postgresql://..., got {self.store!r}")
        if self.key_size_bits <= 0 or self.key_size_bits % 8:
            raise field_error("kms", "key_size_bits", f"must be a positive multiple of 8, got {self.key_size_bits}")
        if not 0 < self.low_water_keys < self.high_water_keys <= self.capacity_keys:
            raise field_error("kms", "high_water_keys",
                              "must satisfy 0 < low_water_keys < high_water_keys ≤ capacity_keys")
        parse_address("kms", "etsi_listen", self.etsi_listen)
        if self.skip_listen:
            if not self.tls_cert:
                raise field_error("kms", "skip_listen", "needs tls_cert, tls_key and ca_cert (SKIP runs over TLS)")
            if parse_address("kms", "skip_listen", self.skip_listen) == parse_address("kms", "etsi_listen",
                                                                                      self.etsi_listen):
                raise field_error("kms", "skip_listen", f"must differ from etsi_listen (both {self.skip_listen})")
        if self.skip_psk_file and not self.skip_listen:
            raise field_error("kms", "skip_psk_file", "is set but skip_listen is not (the PSKs are SKIP's)")
        local = self.local_uid_map()
        if self.local_socket and not local:
            raise field_error("kms", "local_users", "must admit at least one UID:SAE_ID when local_socket is set")

    def local_uid_map(self) -> dict[int, str]:
        """``local_users`` as {uid: SAE ID}."""
        out = {}
        for entry in self.local_users:
            uid, sep, sae = entry.partition(":")
            if not sep or not uid.isdigit() or not sae:
                raise field_error("kms", "local_users", f"entries must be UID:SAE_ID, got {entry!r}")
            out[int(uid)] = sae
        return out


MIN_ADMIN_TOKEN_CHARS = 16


def check_admin_listen(listen: str, token: str) -> tuple[str, int] | None:
    """(host, port) of ``[admin] listen``, or None when it is empty (no admin listener); ConfigError naming the field.

    The admin listener serves metrics, the dashboard and the status without TLS, so a non-loopback
    address needs ``[admin] token`` (then every data path requires it as a bearer token).
    """
    if token and len(token) < MIN_ADMIN_TOKEN_CHARS:
        raise field_error("admin", "token", f"must be at least {MIN_ADMIN_TOKEN_CHARS} characters (a random "
                          f"secret), got {len(token)}")
    if not listen:
        return None
    host, port = parse_address("admin", "listen", listen)
    if not is_loopback(host) and not token:
        raise field_error("admin", "listen", f"{listen} is not a loopback address, and the admin listener serves "
                          "the link's figures without TLS: set [admin] token to require a bearer token, or keep "
                          "it on 127.0.0.1")
    return host, port


@dataclass(frozen=True)
class AdminSection:
    """The admin HTTP listener: Prometheus ``/metrics``, the dashboard and ``/status.json`` (docs/operations.md)."""

    listen: str = "127.0.0.1:0"
    """HOST:PORT (port 0: a free port, named in status.json); empty: no admin listener."""
    token: str = field(default="", repr=False)
    """Bearer token required on every data path; needed for a non-loopback ``listen``."""

    def __post_init__(self) -> None:
        check_admin_listen(self.listen, self.token)


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
    admin: AdminSection = field(default_factory=AdminSection)

    def resolve(self, relative: str) -> Path:
        """A path from the config, relative to the config file's folder unless absolute."""
        p = Path(relative).expanduser()
        return p if p.is_absolute() else (self.path.parent / p)

    @property
    def data_dir(self) -> Path:
        return self.resolve(self.site.data_dir)

    @property
    def quantum_on_loopback(self) -> bool:
        """Whether the quantum-channel connection stays on this host (``[link] quantum`` is a loopback address)."""
        return is_loopback(parse_address("link", "quantum", self.link.quantum)[0])

    @property
    def key_caveats(self) -> tuple[str, ...]:
        """Why keys of this node are not secret against everyone, one sentence each (for status, logs and proofs).

        Empty only for a real device, which does not exist yet: the simulated device's quantum channel is
        a TCP connection carrying the raw key in clear, and a seeded simulation makes Alice's bits
        reproducible. No key bytes and no seed value appear.
        """
        caveats = []
        if self.device.simulated:
            where = "this host's loopback" if self.quantum_on_loopback else "the network (simulation test bed)"
            caveats.append(
                f"simulated device: the quantum-channel connection ([link] quantum {self.link.quantum}, over {where}) "
                "carries every arriving photon's number, basis and bit in clear, so keys are not secret from "
                "anyone who can read it"
            )
        if self.device.source == "records":
            caveats.append(
                f"recorded device: both parties' raw records are read from files ([device] records_dir "
                f"{self.device.records_dir}), so keys are as secret as those files (records written by "
                "qkdstack simulate --save come from a simulator and are not secret)"
            )
        if self.device.seeded and self.device.simulated:
            caveats.append(
                "seeded simulation: [device] seed makes the simulator's randomness (Alice's bits, at the "
                "transmitter) a reproducible PCG64 stream, so keys are not secret from anyone who knows the seed"
            )
        return tuple(caveats)

    @property
    def device_labels(self) -> dict[str, Any]:
        """JSON-ready labels of where keys come from: ``simulated``, ``seeded``, ``simulation_testbed``,
        ``quantum_on_loopback`` and the ``caveats`` sentences (see :attr:`key_caveats`)."""
        return {
            "simulated": self.device.simulated,
            "seeded": self.device.seeded,
            "simulation_testbed": self.device.simulation_testbed,
            "quantum_on_loopback": self.quantum_on_loopback,
            "caveats": list(self.key_caveats),
        }


SECTIONS = {
    "site": SiteSection,
    "link": LinkSection,
    "device": DeviceSection,
    "protocol": ProtocolSection,
    "auth": AuthSection,
    "kms": KmsSection,
    "admin": AdminSection,
}


def parse_config(data: dict[str, Any], path: Path) -> NodeConfig:
    unknown = sorted(set(data) - set(SECTIONS))
    if unknown:
        raise ConfigError(f"{path.name}: unknown section [{unknown[0]}] (known: {', '.join(SECTIONS)})")
    if "site" not in data:
        raise ConfigError(f"{path.name}: section [site] is required")
    try:
        sections = {name: load_section(cls, name, data.get(name)) for name, cls in SECTIONS.items()}
        config = NodeConfig(path=path, **sections)
        _check_quantum_address(config)
        _check_distinct_listeners(config)
    except ConfigError as exc:
        raise ConfigError(f"{path.name}: {exc}") from None
    return config


def _check_quantum_address(config: NodeConfig) -> None:
    """Refuse a quantum channel off this host unless the deployment is declared a simulation test bed."""
    if config.quantum_on_loopback or config.device.simulation_testbed:
        return
    raise field_error(
        "link", "quantum",
        f"{config.link.quantum} is not a loopback address, and the simulated quantum channel carries every "
        "arriving photon's number, basis and bit in clear, so anyone who can read that connection reads the "
        "raw key: keep it on 127.0.0.1, or set [device] simulation_testbed = true for a test bed whose keys "
        "need not be secret",
    )


def _check_distinct_listeners(config: NodeConfig) -> None:
    """The receiver's ETSI 014 listener must not take one of its own link addresses."""
    if config.site.role != "receiver" or not config.kms.tls_cert:
        return
    etsi = parse_address("kms", "etsi_listen", config.kms.etsi_listen)
    for name in ("classical", "quantum", "kms"):
        if parse_address("link", name, getattr(config.link, name)) == etsi:
            raise field_error("kms", "etsi_listen", f"must differ from [link] {name} (both {config.kms.etsi_listen}): "
                              "the receiver listens on each")


def read_toml(path: Path) -> dict[str, Any]:
    """A configuration file's TOML; every way it can fail is one sentence naming the file."""
    try:
        return tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"configuration file {path} does not exist") from None
    except IsADirectoryError:
        raise ConfigError(f"configuration file {path} is a folder, not a TOML file") from None
    except OSError as exc:
        raise ConfigError(f"configuration file {path} cannot be read ({exc.strerror})") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path.name} is not valid TOML: it is not UTF-8 text") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path.name} is not valid TOML: {exc}") from None


def load_config(path: str | Path, *, check_files: bool = True) -> NodeConfig:
    """Read and validate a node configuration file.

    ``check_files`` (default) also checks what the configuration names on disk (:func:`check_files`),
    so that a node fails before it starts rather than half-way through start-up.
    """
    path = Path(path)
    config = parse_config(read_toml(path), path.resolve())
    if check_files:
        try:
            check_files_of(config)
        except ConfigError as exc:
            raise ConfigError(f"{path.name}: {exc}") from None
    return config


# ------------------------------------------------------------------------------------------
# What the configuration names on disk and on the network


def _creatable_folder(section: str, name: str, folder: Path) -> None:
    """``folder`` is a folder this process may write in, or can be made as one (the node makes it)."""
    try:
        st = folder.stat()
    except (FileNotFoundError, NotADirectoryError):  # ENOTDIR: a component is a regular file (found below)
        st = None
    except OSError as exc:
        raise field_error(section, name, f"names {folder}, which cannot be reached ({exc.strerror})") from None
    if st is not None:
        if not stat.S_ISDIR(st.st_mode):
            raise field_error(section, name, f"names {folder}, which exists and is not a folder")
        if not os.access(folder, os.W_OK | os.X_OK):
            raise field_error(section, name, f"names {folder}, a folder this process cannot write in")
        return
    for parent in folder.parents:
        try:
            pst = parent.stat()
        except (FileNotFoundError, NotADirectoryError):
            continue
        except OSError as exc:
            raise field_error(section, name, f"names {folder}, which cannot be made ({parent}: {exc.strerror})") \
                from None
        if not stat.S_ISDIR(pst.st_mode):
            raise field_error(section, name, f"names {folder}, which cannot be made: {parent} is a file, not a folder")
        if not os.access(parent, os.W_OK | os.X_OK):
            raise field_error(section, name, f"names {folder}, which cannot be made: {parent} is not writable")
        return


def _read_file(section: str, name: str, path: Path, what: str) -> bytes:
    """The bytes of a file the configuration names, or one sentence of why it cannot be used."""
    try:
        st = path.stat()
    except FileNotFoundError:
        raise field_error(section, name, f"names {path}, which does not exist") from None
    except OSError as exc:
        raise field_error(section, name, f"names {path}, which cannot be reached ({exc.strerror})") from None
    if stat.S_ISDIR(st.st_mode):
        raise field_error(section, name, f"names {path}, which is a folder, not {what}")
    if not stat.S_ISREG(st.st_mode):
        raise field_error(section, name, f"names {path}, which is not a regular file ({what} expected)")
    try:
        return path.read_bytes()
    except OSError as exc:
        raise field_error(section, name, f"names {path}, which cannot be read ({exc.strerror})") from None


def _pem_certificates(section: str, name: str, path: Path) -> list[x509.Certificate]:
    data = _read_file(section, name, path, "a PEM certificate file")
    try:
        found = x509.load_pem_x509_certificates(data)
    except ValueError:
        found = []
    if not found:
        raise field_error(section, name, f"names {path}, which holds no PEM certificate")
    return found


def _check_tls(config: NodeConfig) -> None:
    """Load the ETSI 014 server's certificate chain, key and client CA as the server will, naming the bad field.

    The same :class:`ssl.SSLContext` calls as :func:`qkdstack.kms.etsi014.server_ssl_context`, after
    parsing each file alone so that a failure is pinned on one field. Nothing of the key is reported.
    """
    kms = config.kms
    cert_path, key_path, ca_path = (config.resolve(p) for p in (kms.tls_cert, kms.tls_key, kms.ca_cert))
    leaf = _pem_certificates("kms", "tls_cert", cert_path)[0]
    key_pem = _read_file("kms", "tls_key", key_path, "a PEM private key file")
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except Exception:  # garbage (ValueError), encrypted (TypeError), an unsupported algorithm: never echo the bytes
        raise field_error("kms", "tls_key", f"names {key_path}, which holds no unencrypted PEM private key") \
            from None
    raw = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    if key.public_key().public_bytes(*raw) != leaf.public_key().public_bytes(*raw):
        raise field_error("kms", "tls_key", f"({key_path}) does not match the certificate of [kms] tls_cert "
                          f"({cert_path}): the first certificate there must be the one issued for this key")
    _pem_certificates("kms", "ca_cert", ca_path)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        ctx.load_cert_chain(str(cert_path), str(key_path))
    except (ssl.SSLError, OSError) as exc:
        reason = getattr(exc, "reason", None) or exc.strerror or "unknown reason"
        raise field_error("kms", "tls_cert", f"({cert_path}) and tls_key cannot be loaded for TLS ({reason})") \
            from None
    try:
        ctx.load_verify_locations(str(ca_path))
    except (ssl.SSLError, OSError) as exc:
        reason = getattr(exc, "reason", None) or exc.strerror or "unknown reason"
        raise field_error("kms", "ca_cert", f"({ca_path}) cannot be loaded as a TLS CA ({reason})") from None


def check_files_of(config: NodeConfig) -> None:
    """Check what the configuration names on disk; raises :class:`ConfigError` naming the field.

    The data directory and the folders of the SQLite store and of the in-unit delivery socket must
    be folders the node can write in, or be makeable; the store itself, if it exists, a regular file,
    the socket a socket (the node replaces only a socket); the ETSI 014 TLS files must load
    (:func:`_check_tls`). Authentication files are read by the node when it needs them (a PSK only
    while no pool exists) and are not checked here.
    """
    _creatable_folder("site", "data_dir", config.data_dir)
    if config.device.source == "records":
        records = config.resolve(config.device.records_dir)
        if not records.is_dir():
            raise field_error("device", "records_dir", f"names {records}, which is not an existing folder (the "
                              "device's alice/ and bob/ frame files go there)")
    store = config.kms.store
    if store.startswith("sqlite:///"):
        db = config.resolve(store.removeprefix("sqlite:///"))
        _creatable_folder("kms", "store", db.parent)
        if db.exists() and not db.is_file():
            raise field_error("kms", "store", f"names {db}, which exists and is not a regular file")
    if config.kms.local_socket:
        socket_path = config.resolve(config.kms.local_socket)
        if len(os.fsencode(socket_path)) > 107:  # sun_path holds 108 bytes with the terminating NUL
            raise field_error("kms", "local_socket", f"names {socket_path}, longer than a Unix socket path may be "
                              "(107 bytes)")
        _creatable_folder("kms", "local_socket", socket_path.parent)
        if socket_path.exists() and not socket_path.is_socket():
            raise field_error("kms", "local_socket", f"names {socket_path}, which exists and is not a socket")
    if config.kms.tls_cert:
        _check_tls(config)
    if config.kms.skip_psk_file:
        from qkdstack.kms.skip import load_psk_file

        load_psk_file(config.resolve(config.kms.skip_psk_file))


def listen_addresses(config: NodeConfig) -> list[tuple[str, str, str]]:
    """(section, field, HOST:PORT) of every address this node listens on."""
    out = []
    if config.site.role == "receiver":
        out += [("link", name, getattr(config.link, name)) for name in ("classical", "quantum", "kms")]
    if config.kms.tls_cert:
        out.append(("kms", "etsi_listen", config.kms.etsi_listen))
    if config.kms.skip_listen:
        out.append(("kms", "skip_listen", config.kms.skip_listen))
    if config.admin.listen and not config.admin.listen.endswith(":0"):
        out.append(("admin", "listen", config.admin.listen))
    return out


def check_listen_addresses(config: NodeConfig) -> None:
    """Bind, and release at once, every address the node will listen on (as :func:`asyncio.start_server` will).

    Raises :class:`ConfigError` naming the field whose address is taken (another node or program holds
    it) or not on this host. A port taken between this check and the node's own bind is reported by the
    node the same way.
    """
    for section, name, address in listen_addresses(config):
        check_bind(section, name, address)


def check_bind(section: str, name: str, address: str) -> None:
    """Bind ``address`` (the field ``[section] name``) and release it at once; ConfigError naming the field."""
    host, port = parse_address(section, name, address)
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise field_error(section, name, f"{address}: {host} does not resolve ({exc.strerror})") from None
    for family, kind, proto, _, sockaddr in infos:
        with socket.socket(family, kind, proto) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind(sockaddr)
            except OSError as exc:
                why = _BIND_ERRORS.get(exc.errno or 0, "")
                raise field_error(section, name, f"{address} cannot be listened on ({exc.strerror}){why}") from None


_BIND_ERRORS = {
    errno.EADDRINUSE: ": another program, perhaps another node, holds that port",
    errno.EADDRNOTAVAIL: ": the host is not an address of this machine",
    errno.EACCES: ": ports below 1024 need privileges",
}
