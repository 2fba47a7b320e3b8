"""OpenPGP web-of-trust bootstrap, using GnuPG itself (``gpg`` 2.2+) with a private home directory per node.

Why GnuPG: its trust database *is* the reference implementation of the web of trust; PGPy does not
compute key validity at all (and its 0.6 release predates the ``cryptography`` API in use here).
So the trust decision is GnuPG's own, computed with ``--trust-model pgp``:

* the node's own key is *ultimately* trusted (owner trust 6), and every key it certifies is valid;
* each introducer carries an owner trust set by the operator: ``full`` (5) or ``marginal`` (4);
* a key is *fully valid* when it is certified by one valid, fully trusted introducer or by
  ``marginals_needed`` (default 3) valid, marginally trusted ones (``completes_needed`` full ones,
  default 1), along certification paths of at most ``max_cert_depth`` (default 5) steps;
* a revoked or expired key is never valid.

The peer is accepted only when its key is *fully* valid (validity ``f`` or ``u`` in GnuPG's colon
listing); ``m`` (marginal validity: e.g. two of three marginal introducers) is refused. The first
round's transcript digest is signed with the node's key (a detached OpenPGP signature) and verified
against the accepted peer key: GnuPG's ``VALIDSIG`` status must name the peer's primary fingerprint.

Requirements: ``gpg`` on ``PATH`` (Debian package ``gnupg``). Every call runs ``gpg --batch`` with
``--homedir`` the node's directory (created 0700); :meth:`GpgKeyring.close` stops the agent GnuPG starts.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from qkdstack.auth.pki import PeerRefused
from qkdstack.errors import ConfigError

_LABEL = b"qkdstack/pgp-transcript/v1\n"
TRUST_LEVELS = {"undefined": 2, "none": 3, "marginal": 4, "full": 5, "ultimate": 6}


class GpgKeyring:
    """A GnuPG home directory holding one node's keys, its introducers' trust and its peers' keys."""

    def __init__(
        self,
        homedir: str | os.PathLike[str],
        *,
        marginals_needed: int = 3,
        completes_needed: int = 1,
        max_cert_depth: int = 5,
        gpg: str | None = None,
        faked_time: str | None = None,
    ) -> None:
        exe = gpg or shutil.which("gpg")
        if exe is None:
            raise ConfigError("the pgp bootstrap needs GnuPG: install the 'gnupg' package (gpg not found on PATH).")
        if marginals_needed < 1 or completes_needed < 1 or not 1 <= max_cert_depth <= 255:
            raise ConfigError("marginals_needed and completes_needed must be >= 1 and max_cert_depth in 1..255.")
        self.gpg = exe
        self.homedir = Path(homedir)
        self.homedir.mkdir(parents=True, exist_ok=True)
        self.homedir.chmod(0o700)
        self.marginals_needed = marginals_needed
        self.completes_needed = completes_needed
        self.max_cert_depth = max_cert_depth
        self.faked_time = faked_time

    def __repr__(self) -> str:
        return f"GpgKeyring(homedir={str(self.homedir)!r}, marginals_needed={self.marginals_needed})"

    # ------------------------------------------------------------------------------- plumbing

    def _run(self, *args: str, stdin: bytes | None = None, check: bool = True) -> subprocess.CompletedProcess[bytes]:
        cmd = [
            self.gpg, "--homedir", str(self.homedir), "--batch", "--no-tty", "--yes",
            "--pinentry-mode", "loopback", "--passphrase", "",
            "--trust-model", "pgp",
            "--marginals-needed", str(self.marginals_needed),
            "--completes-needed", str(self.completes_needed),
            "--max-cert-depth", str(self.max_cert_depth),
            "--no-auto-key-locate", "--no-auto-key-retrieve",
        ]  # fmt: skip
        if self.faked_time:
            cmd += ["--faked-system-time", self.faked_time]
        proc = subprocess.run([*cmd, *args], input=stdin, capture_output=True, timeout=60)
        if check and proc.returncode != 0:
            err = proc.stderr.decode(errors="replace").strip().splitlines()
            raise ConfigError(f"gpg {args[0]} failed: {err[-1] if err else 'exit ' + str(proc.returncode)}.")
        return proc

    def close(self) -> None:
        """Stop the gpg-agent that GnuPG started for this home directory."""
        gpgconf = shutil.which("gpgconf")
        if gpgconf:
            subprocess.run([gpgconf, "--homedir", str(self.homedir), "--kill", "all"], capture_output=True, timeout=30)

    # ------------------------------------------------------------------------------- keys

    def generate_key(self, user_id: str, expire: str = "2y") -> str:
        """Make an Ed25519 certify+sign key for ``user_id``; returns its fingerprint.

        No passphrase: the 0700 home directory is the secret, as for the node's other key files.
        """
        self._run("--quick-gen-key", user_id, "ed25519", "cert,sign", expire)
        return self.fingerprint(user_id)

    def fingerprint(self, user_id_or_fpr: str) -> str:
        out = self._run("--with-colons", "--fingerprint", "--list-keys", user_id_or_fpr).stdout.decode()
        fprs = [line.split(":")[9] for line in out.splitlines() if line.startswith("fpr:")]
        if not fprs:
            raise ConfigError(f"no OpenPGP key for {user_id_or_fpr!r} in {self.homedir}.")
        return fprs[0]

    def export_public(self, fpr: str) -> bytes:
        """The armored public key with all its certifications."""
        return self._run("--armor", "--export-options", "export-local-sigs", "--export", fpr).stdout

    def import_keys(self, data: bytes) -> None:
        self._run("--import", stdin=data)

    def certify(self, signer_fpr: str, target_fpr: str) -> None:
        """Certify (sign) all user ids of ``target_fpr`` with ``signer_fpr``'s key (exportable signature)."""
        self._run("--default-key", signer_fpr, "--quick-sign-key", target_fpr)

    def set_owner_trust(self, fpr: str, level: str) -> None:
        """How far this node trusts ``fpr`` as an introducer: ``none``/``marginal``/``full``/``ultimate``."""
        if level not in TRUST_LEVELS:
            raise ConfigError(f"owner trust must be one of {', '.join(TRUST_LEVELS)}, not {level!r}.")
        self._run("--import-ownertrust", stdin=f"{fpr}:{TRUST_LEVELS[level]}:\n".encode())
        self._run("--check-trustdb", check=False)

    def revocation_certificate(self, fpr: str) -> bytes:
        """The revocation certificate GnuPG stored when it made the key (importing it revokes the key)."""
        p = self.homedir / "openpgp-revocs.d" / f"{fpr}.rev"
        text = p.read_bytes()
        return text.replace(b":-----BEGIN PGP PUBLIC KEY BLOCK", b"-----BEGIN PGP PUBLIC KEY BLOCK", 1)

    def validity(self, fpr: str) -> str:
        """GnuPG's validity letter for ``fpr`` (u, f: valid; m: marginal; r: revoked; e: expired; '': absent)."""
        self._run("--check-trustdb", check=False)
        proc = self._run("--with-colons", "--list-keys", fpr, check=False)
        for line in proc.stdout.decode().splitlines():
            if line.startswith("pub:"):
                return line.split(":")[1]
        return ""

    # ------------------------------------------------------------------------------- web of trust

    def accept_peer(self, fpr: str) -> None:
        """Accept ``fpr`` as a peer only if the web of trust makes it fully valid; else :class:`PeerRefused`."""
        v = self.validity(fpr)
        if v in ("f", "u"):
            return
        reasons = {
            "": ("unknown-key", f"the peer key {fpr} is not in the keyring"),
            "r": ("revoked", f"the peer key {fpr} is revoked"),
            "e": ("expired", f"the peer key {fpr} has expired"),
            "m": ("untrusted", f"the peer key {fpr} is only marginally valid (fewer than {self.marginals_needed} "
                  f"marginal or {self.completes_needed} full introducer certifications)"),
        }  # fmt: skip
        reason, detail = reasons.get(
            v, ("untrusted", f"the peer key {fpr} is not certified by enough trusted introducers (validity {v!r})")
        )
        raise PeerRefused(reason, detail)

    # ------------------------------------------------------------------------------- transcripts

    def sign(self, fpr: str, transcript_digest: bytes) -> bytes:
        """A detached binary OpenPGP signature by ``fpr`` over the transcript digest."""
        return self._run("--local-user", fpr, "--detach-sign", "--output", "-", stdin=_LABEL + transcript_digest).stdout

    def verify(self, expected_fpr: str, transcript_digest: bytes, signature: bytes) -> None:
        """Accept ``expected_fpr`` (web of trust) and check its signature over the digest, or :class:`PeerRefused`."""
        self.accept_peer(expected_fpr)
        with tempfile.NamedTemporaryFile(dir=self.homedir, suffix=".sig") as f:
            f.write(signature)
            f.flush()
            proc = self._run("--status-fd", "1", "--verify", f.name, "-", stdin=_LABEL + transcript_digest, check=False)
        status = proc.stdout.decode(errors="replace").splitlines()
        valid = [s.split() for s in status if s.startswith("[GNUPG:] VALIDSIG ")]
        if proc.returncode != 0 or not valid:
            raise PeerRefused("bad-signature", "the OpenPGP transcript signature does not verify")
        primary = valid[0][11] if len(valid[0]) > 11 else valid[0][2]
        if primary.upper() != expected_fpr.upper():
            raise PeerRefused(
                "wrong-name", f"the transcript is signed by {primary}, not by the peer key {expected_fpr}"
            )


def pgp_signer(ring: GpgKeyring, own_fpr: str) -> Any:
    """A bootstrap :data:`~qkdstack.auth.bootstrap.Signer` signing with the node's OpenPGP key."""
    return lambda digest: {"fingerprint": own_fpr, "signature": ring.sign(own_fpr, digest)}


def pgp_verifier(ring: GpgKeyring, expected_peer_fpr: str) -> Any:
    """A bootstrap :data:`~qkdstack.auth.bootstrap.Verifier` accepting ``expected_peer_fpr`` via the web of trust."""

    def verify(fields: dict[str, Any], digest: bytes) -> None:
        sig = fields.get("signature")
        if not isinstance(sig, bytes):
            raise PeerRefused("malformed", "the peer's OpenPGP bundle has no signature")
        if str(fields.get("fingerprint", "")).upper() != expected_peer_fpr.upper():
            raise PeerRefused(
                "wrong-name", f"the peer presents key {fields.get('fingerprint')}, expected {expected_peer_fpr}"
            )
        ring.verify(expected_peer_fpr, digest, sig)

    return verify
