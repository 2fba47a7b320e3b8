"""``qkdstack key export``: one key, taken once over ETSI 014, written as WireGuard / strongSwan PPK / TLS 1.3 PSK.

Real components: two KMEs with their ETSI 014 servers (mutual TLS) on loopback, the ``qkdstack`` command
as a subprocess at each site, and Debian's OpenSSL (``openssl s_server`` / ``s_client``) moving data over
TLS 1.3 keyed by the exported PSK together with ECDHE.
"""

from __future__ import annotations

import asyncio
import base64
import re
import shutil
import socket
import stat
import subprocess
import sys

import pytest

from _kms_support import PKI, Sites, factory_fixture

QKDSTACK = [sys.executable, "-m", "qkdstack.cli"]


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return PKI(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def store_factory(tmp_path):
    yield from factory_fixture("sqlite", tmp_path)


@pytest.fixture
async def sites(store_factory, pki):
    s = await Sites(store_factory).start(pki)
    yield s
    await s.stop()


async def export(sites, pki, site: str, out, *extra: str) -> subprocess.CompletedProcess:
    who, peer = ("SAE_A", "SAE_B") if site == "A" else ("SAE_B", "SAE_A")
    cert, key, ca = pki.files[who]
    url = (sites.srv_a if site == "A" else sites.srv_b).url
    cmd = [*QKDSTACK, "key", "export", "--etsi", url, "--tls-cert", cert, "--tls-key", key, "--ca", ca,
           "--peer", peer, "--out", str(out), *extra]
    return await asyncio.to_thread(subprocess.run, cmd, capture_output=True, text=True, timeout=60)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tls13_psk_exchange(server_psk: str, client_psk: str, message: str) -> tuple[str, str]:
    """openssl s_server (reverses each line it gets) and s_client over TLS 1.3 with external PSKs.

    Returns the client's stdout (the server's answer) and stderr (the connection summary).
    """
    s_id, s_key = server_psk.strip().split(":")
    c_id, c_key = client_psk.strip().split(":")
    port = _free_port()
    server = subprocess.Popen(
        ["openssl", "s_server", "-accept", f"127.0.0.1:{port}", "-tls1_3", "-nocert", "-psk_identity", s_id,
         "-psk", s_key, "-naccept", "1", "-rev"],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    try:
        assert server.stdout is not None
        for _ in range(20):  # s_server prints ACCEPT once it listens
            if server.stdout.readline().startswith(b"ACCEPT"):
                break
        client = subprocess.run(
            ["bash", "-c", f"(printf '%s\\n' '{message}'; sleep 1) | openssl s_client -connect 127.0.0.1:{port} "
             f"-tls1_3 -psk_identity {c_id} -psk {c_key} -brief -nocommands"],
            capture_output=True, text=True, timeout=20,
        )
        return client.stdout, client.stderr
    finally:
        server.kill()
        server.wait(5)


async def test_export_at_both_sites_gives_the_same_key_in_each_form(sites, pki, tmp_path):
    a = await export(sites, pki, "A", tmp_path / "a")
    assert a.returncode == 0, a.stderr
    key_id = re.search(r"key_ID ([0-9a-f-]{36})", a.stdout).group(1)
    b = await export(sites, pki, "B", tmp_path / "b", "--key-id", key_id)
    assert b.returncode == 0, b.stderr
    files = ["wireguard.conf", "wireguard.psk", "swanctl-ppk.conf", "tls-psk.txt"]
    for name in files:
        for side in ("a", "b"):
            assert stat.S_IMODE((tmp_path / side / name).stat().st_mode) == 0o600
        assert (tmp_path / "a" / name).read_text() == (tmp_path / "b" / name).read_text()
    key = base64.b64decode((tmp_path / "a" / "wireguard.psk").read_text())
    assert len(key) == 32
    for proc in (a, b):  # key bytes only in the files
        assert key.hex() not in proc.stdout + proc.stderr
        assert base64.b64encode(key).decode() not in proc.stdout + proc.stderr
    wg = (tmp_path / "a" / "wireguard.conf").read_text()
    assert f"PresharedKey = {base64.b64encode(key).decode()}\n" in wg
    ppk = (tmp_path / "a" / "swanctl-ppk.conf").read_text()
    assert f"ppk_id = {key_id}" in ppk and "ppk_required = yes" in ppk
    assert f"secret = 0x{key.hex()}" in ppk and f"id = {key_id}" in ppk
    assert (tmp_path / "a" / "tls-psk.txt").read_text() == f"{key_id}:{key.hex()}\n"
    # taken once: a second fetch of the same key at B is refused, nothing is written
    again = await export(sites, pki, "B", tmp_path / "b2", "--key-id", key_id)
    assert again.returncode != 0 and "400" in again.stderr and not (tmp_path / "b2" / "tls-psk.txt").exists()
    await sites.agree()


@pytest.mark.skipif(shutil.which("openssl") is None, reason="Debian's openssl tool is not installed "
                    "(scripts/test.sh installs it)")
async def test_tls13_with_the_exported_psk_and_ecdhe(sites, pki, tmp_path):
    a = await export(sites, pki, "A", tmp_path / "a", "--format", "tls")
    key_id = re.search(r"key_ID ([0-9a-f-]{36})", a.stdout).group(1)
    b = await export(sites, pki, "B", tmp_path / "b", "--format", "tls", "--key-id", key_id)
    assert b.returncode == 0, b.stderr
    psk_a, psk_b = (tmp_path / "a" / "tls-psk.txt").read_text(), (tmp_path / "b" / "tls-psk.txt").read_text()
    out, summary = await asyncio.to_thread(_tls13_psk_exchange, psk_a, psk_b, "data keyed by QKD")
    assert "DKQ yb deyek atad" in out, summary  # the server's reversed line came back over the tunnel
    assert "Protocol version: TLSv1.3" in summary
    assert "No peer certificate" in summary  # authenticated by the PSK alone
    assert re.search(r"Server Temp Key: (X25519|X448|ECDH|DH)", summary)  # (EC)DHE mixed in: psk_dhe_ke
    # the same identity with another key (the next one, exported at A only) does not open the server
    other = await export(sites, pki, "A", tmp_path / "c", "--format", "tls")
    assert other.returncode == 0
    wrong = f"{key_id}:{(tmp_path / 'c' / 'tls-psk.txt').read_text().strip().split(':')[1]}"
    out, summary = await asyncio.to_thread(_tls13_psk_exchange, psk_a, wrong, "data keyed by QKD")
    assert "DKQ yb deyek atad" not in out and "CONNECTION ESTABLISHED" not in summary


async def test_checks_come_before_the_key_is_taken(sites, pki, tmp_path):
    link = sites.a.config.link_id
    before = await sites.a.store.counts(link)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "tls-psk.txt").write_text("keep me")
    cases = [
        (tmp_path / "full", (), "already holds tls-psk.txt"),
        (tmp_path / "x", ("--size", "512"), "--size must be 256 for the wireguard form"),
        (tmp_path / "x", ("--size", "100", "--format", "tls"), "multiple of 8"),
        (tmp_path / "x", ("--key-id", "nope"), "--key-id must be a key ID"),
    ]
    for out, extra, words in cases:
        done = await export(sites, pki, "A", out, *extra)
        assert done.returncode == 2 and words in done.stderr and done.stderr.count("\n") == 1, done.stderr
    assert (tmp_path / "full" / "tls-psk.txt").read_text() == "keep me"
    assert await sites.a.store.counts(link) == before
    # a 512-bit key is fine without the WireGuard form
    done = await export(sites, pki, "A", tmp_path / "big", "--size", "512", "--format", "strongswan")
    assert done.returncode == 0
    secret = re.search(r"secret = 0x([0-9a-f]+)", (tmp_path / "big" / "swanctl-ppk.conf").read_text()).group(1)
    assert len(bytes.fromhex(secret)) == 64


def test_config_names_the_sites_etsi_server_and_the_sae_files(tmp_path):
    import argparse

    from qkdstack.commands.key import _source
    from qkdstack.node.deployment import write_deployment

    layouts = write_deployment(tmp_path / "dep", ["A", "B"], base_port=7100)
    args = argparse.Namespace(config=str(layouts["A"].config), etsi=None, local=None, sae="SAE_A")
    kind, (url, cert, key, ca) = _source(args)
    assert (kind, url) == ("etsi", layouts["A"].etsi_url)
    assert (cert, key) == tuple(str(p) for p in layouts["A"].sae_cert("SAE_A")) and ca == str(layouts["A"].ca)


def _gnutls_server_openssl_client(server_file, client_psk: str, message: str) -> tuple[str, str]:
    """gnutls-serv (echo, PSKs from the exported file: the key stays off its command line) and openssl s_client."""
    c_id, c_key = client_psk.strip().split(":")
    port = _free_port()
    priority = "NORMAL:-VERS-ALL:+VERS-TLS1.3:+ECDHE-PSK:+DHE-PSK:-PSK"  # TLS 1.3, psk_dhe_ke only
    server = subprocess.Popen(["gnutls-serv", "--port", str(port), "--pskpasswd", str(server_file),
                               "--priority", priority, "--echo"],
                              stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        assert server.stdout is not None
        for _ in range(50):
            if b"listening" in server.stdout.readline():
                break
        client = subprocess.run(
            ["bash", "-c", f"(printf '%s\\n' '{message}'; sleep 1) | openssl s_client -connect 127.0.0.1:{port} "
             f"-tls1_3 -psk_identity {c_id} -psk {c_key} -brief -nocommands"],
            capture_output=True, text=True, timeout=20,
        )
        return client.stdout, client.stderr
    finally:
        server.kill()
        server.wait(5)


@pytest.mark.skipif(shutil.which("gnutls-serv") is None or shutil.which("openssl") is None,
                    reason="Debian's gnutls-bin or openssl is not installed (scripts/test.sh installs them)")
async def test_gnutls_server_and_openssl_client_interoperate_on_the_exported_psk(sites, pki, tmp_path):
    a = await export(sites, pki, "A", tmp_path / "a", "--format", "tls")
    key_id = re.search(r"key_ID ([0-9a-f-]{36})", a.stdout).group(1)
    b = await export(sites, pki, "B", tmp_path / "b", "--format", "tls", "--key-id", key_id)
    assert b.returncode == 0, b.stderr
    out, summary = await asyncio.to_thread(_gnutls_server_openssl_client, tmp_path / "a" / "tls-psk.txt",
                                           (tmp_path / "b" / "tls-psk.txt").read_text(), "two TLS stacks, one key")
    assert "two TLS stacks, one key" in out, summary  # echoed back by GnuTLS
    assert "Protocol version: TLSv1.3" in summary and "No peer certificate" in summary
    assert re.search(r"Server Temp Key: (X25519|X448|ECDH|DH)", summary)


async def test_export_by_in_unit_delivery(sites, tmp_path):
    import os

    from qkdstack.kms.local import serve_local

    uid = os.getuid()
    async with serve_local(sites.a, tmp_path / "a.sock", {uid: "SAE_A"}), \
            serve_local(sites.b, tmp_path / "b.sock", {uid: "SAE_B"}):
        run = [*QKDSTACK, "key", "export", "--format", "tls"]
        a = await asyncio.to_thread(subprocess.run, [*run, "--local", str(tmp_path / "a.sock"), "--peer", "SAE_B",
                                                     "--out", str(tmp_path / "a")], capture_output=True, text=True)
        assert a.returncode == 0, a.stderr
        key_id = re.search(r"key_ID ([0-9a-f-]{36})", a.stdout).group(1)
        b = await asyncio.to_thread(subprocess.run, [*run, "--local", str(tmp_path / "b.sock"), "--peer", "SAE_A",
                                                     "--key-id", key_id, "--out", str(tmp_path / "b")],
                                    capture_output=True, text=True)
        assert b.returncode == 0, b.stderr
    assert (tmp_path / "a" / "tls-psk.txt").read_text() == (tmp_path / "b" / "tls-psk.txt").read_text()
    await sites.agree()
