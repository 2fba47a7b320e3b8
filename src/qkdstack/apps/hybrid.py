"""Hybrid key derivation: one session key from a QKD key, ML-KEM-768 and X25519.

The combiner
------------
Three shared secrets enter one KDF, as in the concatenation combiners of hybrid TLS
(Stebila, Fluhrer, Gueron, *Hybrid key exchange in TLS 1.3*, draft-ietf-tls-hybrid-design,
§3.3 "Shared secret calculation": the component shared secrets are concatenated and the
result is the input keying material of HKDF-Extract) and of ETSI TS 103 744 V1.2.1
(2025-03), *Quantum-safe Hybrid Key Establishment*, whose concatenate combiner "CatKDF"
derives keys from ``psk || k1 || k2`` and a context computed from the exchanged messages.
Here the QKD key plays the role of TS 103 744's pre-shared key::

    IKM = lp(K_qkd) || lp(K_mlkem) || lp(K_x25519)               lp(x) = u16 length || x
    T   = lp(label) || lp(key_ID) || lp(ek_mlkem) || lp(ct_mlkem) || lp(pk_x25519_I) || lp(pk_x25519_R)
                                                                 (u32 lengths here)
    PRK = HKDF-Extract(salt = label, IKM)                        RFC 5869 §2.2, SHA-384
    OKM = HKDF-Expand(PRK, info = label || purpose || SHA-384(T), L)   RFC 5869 §2.3

The length prefixes make the encodings injective, so no two different (secret, transcript)
tuples feed the KDF the same bytes (draft-ietf-tls-hybrid-design relies on fixed lengths for
the same reason). The transcript binds the QKD key ID, the ML-KEM ciphertext and
encapsulation key and both X25519 public keys, so a key is tied to exactly one run and one
QKD key (TS 103 744 puts the messages MA, MB into its context for the same purpose).

Why the result stays secret while any one input does
-----------------------------------------------------
HKDF-Extract(salt, IKM) is HMAC(salt, IKM): the secrets sit in HMAC's *key* input (the
IKM is shorter than SHA-384's 128-byte block, so HMAC pads it as the key). What is needed
is that HMAC is a PRF when keyed by a string of which only *one part* is uniformly random
and unknown and the rest is known to, or even chosen by, the adversary. This is the
"dual-PRF" view of HMAC used by the hybrid-TLS draft (its security considerations), and
by Bindel, Brendel, Fischlin, Goncalves, Stebila, *Hybrid Key Encapsulation Mechanisms and
Authenticated Key Exchange*, PQCrypto 2019 (dual-PRF and nested combiners); Bellare and
Lysyanskaya, *Symmetric and Dual PRFs from Standard Assumptions: A Generic Validation of an
HMAC Assumption*, IACR ePrint 2015/1198, justify the assumption for HMAC; in the random
oracle model it is immediate. Giacon, Heuer, Poettering, *KEM Combiners*, PKC 2018, show
that hashing the shared secrets *together with the ciphertexts* gives a CCA-secure KEM if any
one component is — which is why ``ct_mlkem`` and the public keys are in ``T``. Then:

* ML-KEM-768 secure (FIPS 203, post-quantum): K_mlkem is pseudorandom to the adversary, so
  PRK and every key expanded from it are pseudorandom, whatever X25519 and QKD give.
* X25519 secure (classical adversary today): same argument with K_x25519.
* QKD key secret: K_qkd is uniformly random and independent of everything public
  (information-theoretically, up to the QKD protocol's ε_sec); the same PRF argument
  applies. Note the result is then *computationally* secure (HMAC-SHA-384 keyed with a
  256-bit key: ~128-bit against Grover), not information-theoretically: for that use the
  one-time pad mode (:mod:`qkdstack.apps.otp`).

Handshake and scarcity of QKD key
---------------------------------
:func:`initiator` and :func:`responder` run over a
:class:`~qkdstack.transport.channel.Channel`. The post-quantum and classical parts run
first and are key-confirmed on their own (tags from a pre-confirmation key derived from
K_mlkem and K_x25519 only, with the same combiner and purpose ``pre-confirm``); only when
that succeeds does the initiator (the ETSI 014 master) fetch a QKD key and send its key
ID, and only after checking the initiator's pre-confirmation tag does the responder (the
slave) fetch that key by ID. A tampered ciphertext or public key therefore aborts the
handshake before any QKD key is spent (ML-KEM's implicit rejection turns a tampered
ciphertext into an unrelated secret, which the tag exposes). A missing or already-used key
ID fails closed (KeyStoreError, the peer is told ``hybrid.abort``). Only the QKD key
authenticates the peer (ML-KEM and X25519 are ephemeral): an active attacker who relays two
separate ML-KEM/X25519 runs passes both pre-confirmations and is caught at the final
confirmation, after one QKD key was fetched. It learns nothing, but can burn that key. Final key confirmation:
each side sends HMAC-SHA-384 over ``SHA-384(T)`` under its own confirmation key from OKM,
checked with :func:`hmac.compare_digest`.

Messages: ``hybrid.hello`` (I→R: X25519 pk, ML-KEM ek, QKD key size), ``hybrid.reply``
(R→I: X25519 pk, ML-KEM ct, R's pre-confirmation tag), ``hybrid.key`` (I→R: key ID, I's
pre-confirmation tag, I's final tag), ``hybrid.finished`` (R→I: R's final tag),
``hybrid.abort`` (either way, with a reason).
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import logging
import struct
from dataclasses import dataclass, field

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import mlkem, x25519
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from qkdstack.apps.keysource import KeySource, QKDKey
from qkdstack.errors import AuthenticationError, ChannelError, ConfigError, KeyStoreError, ProtocolAbort
from qkdstack.transport.channel import Channel, Message

log = logging.getLogger(__name__)

LABEL = b"qkdstack hybrid v1"
"""Domain-separation label: HKDF salt and prefix of every info string."""
HASH_LEN = 48
KEY_LEN = 32
DEFAULT_QKD_KEY_BITS = 256
MLKEM768_EK_LEN = 1184
MLKEM768_CT_LEN = 1088
X25519_LEN = 32
_SESSION_OKM_LEN = 2 * KEY_LEN + 2 * HASH_LEN + KEY_LEN


def _lp16(data: bytes) -> bytes:
    if len(data) > 0xFFFF:
        raise ConfigError(f"a hybrid KDF secret must be at most 65535 bytes, got {len(data)}")
    return struct.pack(">H", len(data)) + data


def _lp32(data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + data


def hybrid_transcript(key_id: str, mlkem_ek: bytes, mlkem_ct: bytes, x25519_pub_i: bytes, x25519_pub_r: bytes) -> bytes:
    """The transcript T bound into the key (see the module docstring); public data only."""
    return b"".join(_lp32(part) for part in (LABEL, key_id.encode(), mlkem_ek, mlkem_ct, x25519_pub_i, x25519_pub_r))


def hybrid_kdf(
    qkd_key: bytes, mlkem_secret: bytes, x25519_secret: bytes, transcript: bytes, purpose: bytes, length: int
) -> bytes:
    """The concatenation combiner: HKDF-SHA-384 over lp(K_qkd)||lp(K_mlkem)||lp(K_x25519).

    ``info = LABEL || purpose || SHA-384(transcript)``; salt = LABEL. Output ``length`` bytes.
    """
    ikm = _lp16(qkd_key) + _lp16(mlkem_secret) + _lp16(x25519_secret)
    info = LABEL + purpose + hashlib.sha384(transcript).digest()
    return HKDF(algorithm=hashes.SHA384(), length=length, salt=LABEL, info=info).derive(ikm)


def _tag(key: bytes, transcript_hash: bytes, role: bytes) -> bytes:
    return hmac.new(key, role + transcript_hash, hashlib.sha384).digest()


@dataclass(repr=False)
class HybridSession:
    """The outcome of a hybrid handshake (or of a rekey): direction keys and a chain secret.

    ``i2r_key``/``r2i_key`` are 256-bit AEAD keys for initiator→responder and back;
    ``chain`` is the secret a rekey mixes the next QKD key into (:meth:`rekey`). The repr
    shows the key ID, epoch and transcript hash only.
    """

    key_id: str
    epoch: int
    i2r_key: bytes = field(repr=False)
    r2i_key: bytes = field(repr=False)
    chain: bytes = field(repr=False)
    transcript_hash: bytes
    qkd_bits_consumed: int

    def __repr__(self) -> str:
        return (
            f"HybridSession(key_id={self.key_id!r}, epoch={self.epoch}, "
            f"transcript={self.transcript_hash[:8].hex()}…, qkd_bits_consumed={self.qkd_bits_consumed})"
        )

    def rekey(self, qkd_key: QKDKey) -> HybridSession:
        """The next epoch's keys: HKDF over lp(chain)||lp(fresh QKD key), bound to epoch and key ID.

        The old chain secret is not kept by the new session, so keys of earlier epochs
        cannot be recomputed from later state (forward secrecy across rekeys).
        """
        epoch = self.epoch + 1
        info_t = _lp32(struct.pack(">Q", epoch)) + _lp32(qkd_key.key_id.encode()) + _lp32(self.transcript_hash)
        okm = HKDF(
            algorithm=hashes.SHA384(),
            length=3 * KEY_LEN,
            salt=LABEL,
            info=LABEL + b"rekey" + hashlib.sha384(info_t).digest(),
        ).derive(_lp16(self.chain) + _lp16(qkd_key.key))
        return HybridSession(
            key_id=qkd_key.key_id,
            epoch=epoch,
            i2r_key=okm[:KEY_LEN],
            r2i_key=okm[KEY_LEN : 2 * KEY_LEN],
            chain=okm[2 * KEY_LEN :],
            transcript_hash=self.transcript_hash,
            qkd_bits_consumed=self.qkd_bits_consumed + qkd_key.size_bits,
        )


def _session_from(qkd: QKDKey, k_kem: bytes, k_x: bytes, transcript: bytes) -> tuple[HybridSession, bytes, bytes]:
    okm = hybrid_kdf(qkd.key, k_kem, k_x, transcript, b"session", _SESSION_OKM_LEN)
    i2r, r2i = okm[:KEY_LEN], okm[KEY_LEN : 2 * KEY_LEN]
    conf_i = okm[2 * KEY_LEN : 2 * KEY_LEN + HASH_LEN]
    conf_r = okm[2 * KEY_LEN + HASH_LEN : 2 * KEY_LEN + 2 * HASH_LEN]
    chain = okm[2 * KEY_LEN + 2 * HASH_LEN :]
    th = hashlib.sha384(transcript).digest()
    session = HybridSession(qkd.key_id, 0, i2r, r2i, chain, th, qkd.size_bits)
    return session, conf_i, conf_r


def _pre_keys(k_kem: bytes, k_x: bytes, transcript_pre: bytes) -> tuple[bytes, bytes]:
    okm = hybrid_kdf(b"", k_kem, k_x, transcript_pre, b"pre-confirm", 2 * HASH_LEN)
    return okm[:HASH_LEN], okm[HASH_LEN:]


async def _recv_or_abort(channel: Channel, expect: str) -> Message:
    msg = await channel.recv()
    if msg.kind == "hybrid.abort":
        raise ProtocolAbort("hybrid", f"peer aborted the handshake: {msg.fields.get('reason', 'no reason given')}")
    if msg.kind != expect:
        raise ChannelError(f"expected message {expect!r}, received {msg.kind!r}")
    return msg


def _bytes_field(msg: Message, name: str, length: int) -> bytes:
    value = msg[name]
    if not isinstance(value, bytes) or len(value) != length:
        raise ProtocolAbort("hybrid", f"field {name!r} of {msg.kind!r} must be {length} bytes")
    return value


async def _abort(channel: Channel, reason: str) -> None:
    with contextlib.suppress(ChannelError):
        await channel.send("hybrid.abort", reason=reason)


async def initiator(channel: Channel, keys: KeySource, qkd_key_bits: int = DEFAULT_QKD_KEY_BITS) -> HybridSession:
    """Initiator (ETSI 014 master) side of the hybrid handshake; returns the session keys.

    Fetches exactly one QKD key of ``qkd_key_bits``, and only after the ML-KEM and X25519
    parts were confirmed by the responder.
    """
    if qkd_key_bits < 128 or qkd_key_bits % 8:
        raise ConfigError(f"qkd_key_bits must be a multiple of 8 and at least 128, got {qkd_key_bits}")
    dk = mlkem.MLKEM768PrivateKey.generate()
    ek = dk.public_key().public_bytes_raw()
    x_priv = x25519.X25519PrivateKey.generate()
    x_pub_i = x_priv.public_key().public_bytes_raw()
    await channel.send("hybrid.hello", version=1, x25519=x_pub_i, mlkem_ek=ek, qkd_bits=qkd_key_bits)

    reply = await _recv_or_abort(channel, "hybrid.reply")
    x_pub_r = _bytes_field(reply, "x25519", X25519_LEN)
    ct = _bytes_field(reply, "mlkem_ct", MLKEM768_CT_LEN)
    tag_r_pre = _bytes_field(reply, "tag", HASH_LEN)
    try:
        k_kem = dk.decapsulate(ct)
        k_x = x_priv.exchange(x25519.X25519PublicKey.from_public_bytes(x_pub_r))
    except ValueError as exc:
        await _abort(channel, "invalid ML-KEM ciphertext or X25519 key")
        raise ProtocolAbort("hybrid", f"invalid ML-KEM ciphertext or X25519 key ({exc})") from None
    t_pre = hybrid_transcript("", ek, ct, x_pub_i, x_pub_r)
    th_pre = hashlib.sha384(t_pre).digest()
    pre_i, pre_r = _pre_keys(k_kem, k_x, t_pre)
    if not hmac.compare_digest(tag_r_pre, _tag(pre_r, th_pre, b"R")):
        await _abort(channel, "post-quantum/classical key confirmation failed")
        raise AuthenticationError(
            "hybrid handshake: the responder's ML-KEM/X25519 confirmation failed; no QKD key used"
        )

    # Only now spend QKD key.
    try:
        (qkd,) = await keys.get_new_keys(1, qkd_key_bits)
    except KeyStoreError as exc:
        await _abort(channel, "no QKD key available at the initiator")
        raise KeyStoreError(f"hybrid handshake: cannot get a QKD key: {exc}") from None
    transcript = hybrid_transcript(qkd.key_id, ek, ct, x_pub_i, x_pub_r)
    session, conf_i, conf_r = _session_from(qkd, k_kem, k_x, transcript)
    await channel.send(
        "hybrid.key",
        key_id=qkd.key_id,
        pre_tag=_tag(pre_i, th_pre, b"I"),
        tag=_tag(conf_i, session.transcript_hash, b"I"),
    )
    fin = await _recv_or_abort(channel, "hybrid.finished")
    if not hmac.compare_digest(_bytes_field(fin, "tag", HASH_LEN), _tag(conf_r, session.transcript_hash, b"R")):
        raise AuthenticationError("hybrid handshake: the responder's final key confirmation failed")
    log.info("hybrid handshake done (initiator): QKD key %s, %d bits consumed", qkd.key_id, qkd.size_bits)
    return session


async def responder(channel: Channel, keys: KeySource, max_qkd_key_bits: int = 8192) -> HybridSession:
    """Responder (ETSI 014 slave) side of the hybrid handshake; returns the session keys.

    Fetches the QKD key by the ID the initiator names, and only after the initiator's
    ML-KEM/X25519 confirmation tag verified.
    """
    hello = await _recv_or_abort(channel, "hybrid.hello")
    if hello.fields.get("version") != 1:
        await _abort(channel, "unsupported handshake version")
        raise ProtocolAbort("hybrid", f"unsupported handshake version {hello.fields.get('version')!r}")
    x_pub_i = _bytes_field(hello, "x25519", X25519_LEN)
    ek = _bytes_field(hello, "mlkem_ek", MLKEM768_EK_LEN)
    qkd_bits = hello["qkd_bits"]
    if not isinstance(qkd_bits, int) or qkd_bits < 128 or qkd_bits % 8 or qkd_bits > max_qkd_key_bits:
        await _abort(channel, "unacceptable QKD key size")
        raise ProtocolAbort("hybrid", f"unacceptable QKD key size {qkd_bits!r}")
    try:
        k_kem, ct = mlkem.MLKEM768PublicKey.from_public_bytes(ek).encapsulate()
        x_priv = x25519.X25519PrivateKey.generate()
        x_pub_r = x_priv.public_key().public_bytes_raw()
        k_x = x_priv.exchange(x25519.X25519PublicKey.from_public_bytes(x_pub_i))
    except ValueError as exc:
        await _abort(channel, "invalid ML-KEM encapsulation key or X25519 key")
        raise ProtocolAbort("hybrid", f"invalid ML-KEM encapsulation key or X25519 key ({exc})") from None
    t_pre = hybrid_transcript("", ek, ct, x_pub_i, x_pub_r)
    th_pre = hashlib.sha384(t_pre).digest()
    pre_i, pre_r = _pre_keys(k_kem, k_x, t_pre)
    await channel.send("hybrid.reply", x25519=x_pub_r, mlkem_ct=ct, tag=_tag(pre_r, th_pre, b"R"))

    msg = await _recv_or_abort(channel, "hybrid.key")
    key_id = msg["key_id"]
    if not isinstance(key_id, str) or not 0 < len(key_id) <= 128:
        await _abort(channel, "malformed key ID")
        raise ProtocolAbort("hybrid", "the initiator sent a malformed key ID")
    if not hmac.compare_digest(_bytes_field(msg, "pre_tag", HASH_LEN), _tag(pre_i, th_pre, b"I")):
        await _abort(channel, "post-quantum/classical key confirmation failed")
        raise AuthenticationError(
            "hybrid handshake: the initiator's ML-KEM/X25519 confirmation failed; no QKD key used"
        )
    try:
        (qkd,) = await keys.get_keys_by_id([key_id])
    except KeyStoreError as exc:
        await _abort(channel, "QKD key unavailable at the responder")
        raise KeyStoreError(f"hybrid handshake: QKD key {key_id} unavailable: {exc}") from None
    if qkd.size_bits != qkd_bits:
        await _abort(channel, "QKD key size mismatch")
        raise ProtocolAbort("hybrid", f"QKD key {key_id} has {qkd.size_bits} bits, the initiator announced {qkd_bits}")
    transcript = hybrid_transcript(qkd.key_id, ek, ct, x_pub_i, x_pub_r)
    session, conf_i, conf_r = _session_from(qkd, k_kem, k_x, transcript)
    if not hmac.compare_digest(_bytes_field(msg, "tag", HASH_LEN), _tag(conf_i, session.transcript_hash, b"I")):
        await _abort(channel, "final key confirmation failed")
        raise AuthenticationError("hybrid handshake: the initiator's final key confirmation failed")
    await channel.send("hybrid.finished", tag=_tag(conf_r, session.transcript_hash, b"R"))
    log.info("hybrid handshake done (responder): QKD key %s, %d bits consumed", qkd.key_id, qkd.size_bits)
    return session
