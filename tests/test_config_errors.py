"""Broken configurations: `qkdstack node` answers one sentence naming the field and exits 2, before it starts.

A real deployment is written once with `qkdstack init`; each case copies it, breaks one thing, runs
`qkdstack node --config ...` as a subprocess and checks: exit code 2, one line on stderr naming
``[section] field``, no traceback, and no state written (the data directory was never made), so the
node failed before anything started. A subprocess that does not fail is killed at its timeout.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from _node_support import edit_config, free_base_port
from qkdstack.errors import ConfigError
from qkdstack.node.config import check_listen_addresses, load_config

QKDSTACK = [sys.executable, "-m", "qkdstack.cli"]
TIMEOUT_S = 60


@pytest.fixture(scope="module")
def deployment(tmp_path_factory) -> tuple[Path, int]:
    """`qkdstack init` output (sites A transmitter, B receiver) and its base port."""
    out = tmp_path_factory.mktemp("config-errors") / "dep"
    base = free_base_port()
    done = subprocess.run([*QKDSTACK, "init", "--out", str(out), "--base-port", str(base)],
                          capture_output=True, text=True, timeout=TIMEOUT_S)
    assert done.returncode == 0, done.stderr
    return out, base


def _drop_file_override() -> None:
    """In the child, before exec: leave the capabilities that let root read any file (tests run as root)."""
    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (1, 2):  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH
        if libc.prctl(24, cap, 0, 0, 0) != 0:  # PR_CAPBSET_DROP: gone from the bounding set, so gone after exec
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


def _garbage(path: Path) -> None:
    path.write_bytes(b"-----BEGIN PRIVATE KEY-----\nnot base64 at all\n-----END PRIVATE KEY-----\n")


def _folder_instead(path: Path) -> None:
    path.unlink()
    path.mkdir()


def _unreadable(path: Path) -> None:
    path.chmod(0)


def _data_dir_under_file(site: Path) -> None:
    (site / "plain-file").write_text("not a folder\n")
    edit_config(site / "site.toml", site={"data_dir": "plain-file/data"})


def _raw_edit(site: Path, old: str, new: str) -> None:
    """Edit the TOML text itself (a float in an integer field cannot be written through render_toml's ints)."""
    path = site / "site.toml"
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new))


# (case id, site, how to break it, (section, field) expected, words the sentence must also hold)
CASES: list[tuple[str, str, Callable[[Path, int], None], str, str]] = [
    ("tls-key-garbage", "B", lambda s, b: _garbage(s / "tls/kme.key"), "[kms] tls_key", "no unencrypted PEM"),
    ("tls-key-mismatch", "B", lambda s, b: shutil.copy(s / "sae/SAE_B.key", s / "tls/kme.key"),
     "[kms] tls_key", "does not match"),
    ("tls-key-other-site", "A", lambda s, b: shutil.copy(s.parent / "B/tls/kme.key", s / "tls/kme.key"),
     "[kms] tls_key", "does not match"),
    ("tls-key-folder", "B", lambda s, b: _folder_instead(s / "tls/kme.key"), "[kms] tls_key", "is a folder"),
    ("tls-key-missing", "A", lambda s, b: (s / "tls/kme.key").unlink(), "[kms] tls_key", "does not exist"),
    ("tls-key-unreadable", "B", lambda s, b: _unreadable(s / "tls/kme.key"), "[kms] tls_key", "cannot be read"),
    ("ca-garbage", "B", lambda s, b: (s / "tls/ca.pem").write_text("garbage\n"), "[kms] ca_cert",
     "no PEM certificate"),
    ("cert-empty", "A", lambda s, b: (s / "tls/kme.pem").write_bytes(b""), "[kms] tls_cert", "no PEM certificate"),
    ("data-dir-under-file", "B", lambda s, b: _data_dir_under_file(s), "[site] data_dir", "is a file"),
    ("store-is-folder", "A", lambda s, b: (s / "data/keys.db").mkdir(parents=True), "[kms] store", "not a regular"),
    ("pulses-float", "B", lambda s, b: _raw_edit(s, "pulses_per_frame = ", "pulses_per_frame = 1.5e8 #"),
     "[device] pulses_per_frame", "integer"),
    ("quantum-off-loopback", "A", lambda s, b: edit_config(s / "site.toml", link={"quantum": f"192.0.2.7:{b + 1}"}),
     "[link] quantum", "raw key"),
    ("quantum-all-interfaces", "B", lambda s, b: edit_config(s / "site.toml", link={"quantum": f"0.0.0.0:{b + 1}"}),
     "[link] quantum", "raw key"),
    ("crl-not-a-crl", "B", lambda s, b: edit_config(s / "site.toml", kms={"crl": "tls/ca.pem"}), "[kms] crl", ""),
    ("tls-key-unset", "A", lambda s, b: _raw_edit(s, 'tls_key = "tls/kme.key"', ""), "[kms] tls_key", "required"),
    # ports: a listening socket is put on them by the test (see BUSY)
    ("classical-port-in-use", "B", lambda s, b: None, "[link] classical", "in use"),
    ("kms-link-port-in-use", "B", lambda s, b: None, "[link] kms", "in use"),
    ("etsi-port-in-use", "A", lambda s, b: None, "[kms] etsi_listen", "in use"),
]
BUSY = {"classical-port-in-use": 0, "kms-link-port-in-use": 2, "etsi-port-in-use": 10}
"""Case → offset from the base port of the port held busy (init: link at base..base+2, ETSI at base+10+i)."""


@pytest.mark.parametrize(("case", "site", "breaker", "field", "words"), CASES, ids=[c[0] for c in CASES])
def test_broken_configuration_is_one_sentence_and_exit_2(tmp_path, deployment, case, site, breaker, field, words):
    source, base = deployment
    out = tmp_path / "dep"
    shutil.copytree(source, out)
    site_dir = out / site
    breaker(site_dir, base)
    busy = None
    if case in BUSY:
        busy = socket.socket()
        busy.bind(("127.0.0.1", base + BUSY[case]))
        busy.listen()
    preexec = _drop_file_override if case == "tls-key-unreadable" and os.geteuid() == 0 else None
    try:
        # An empty Numba cache, as on a fresh install: a node that would compile first must still say only
        # the one sentence (CI's first node once logged its compile notice before the error).
        cold = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path / "empty-numba-cache")}
        done = subprocess.run([*QKDSTACK, "node", "--config", str(site_dir / "site.toml")], capture_output=True,
                              text=True, timeout=TIMEOUT_S, preexec_fn=preexec, env=cold)
    finally:
        if busy is not None:
            busy.close()
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2, done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("qkdstack node: error: ")
    assert field in lines[0] and words in lines[0], lines[0]
    assert "BEGIN" not in lines[0]  # nothing of a key file's contents
    if case not in ("data-dir-under-file", "store-is-folder"):
        assert not (site_dir / "data").exists(), "the node wrote state before it refused its configuration"


def test_the_unbroken_deployment_passes_every_check(deployment):
    """The control: the checks above refuse broken files, not the ones `qkdstack init` writes."""
    source, _ = deployment
    for site in ("A", "B"):
        config = load_config(source / site / "site.toml")
        check_listen_addresses(config)
        assert config.quantum_on_loopback and not config.device.simulation_testbed


async def test_a_link_port_taken_after_the_check_is_reported_by_the_node_naming_the_field(tmp_path, deployment):
    """The receiver's own bind (a port taken between the start-up check and the listen): the same one sentence."""
    from qkdstack.node.service import Node

    source, base = deployment
    shutil.copytree(source, tmp_path / "dep")
    node = Node(load_config(tmp_path / "dep/B/site.toml"))
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", base + 1))
        busy.listen()
        with pytest.raises(ConfigError, match=r"^\[link\] quantum 127\.0\.0\.1:\d+ cannot be listened on \(Address"):
            await node._listen("quantum", node.cfg.link.quantum)


@pytest.mark.parametrize(
    ("flags", "words"),
    [
        (["--pulses-per-frame", "1.5"], "--pulses-per-frame must be a whole number"),
        (["--pulses-per-frame", "999"], "--pulses-per-frame must be at least 1000"),  # [device]'s own sentence
        (["--base-port", "65530"], "--base-port must lie in"),
        (["--distance-km", "-3"], "--distance-km must be a finite number ≥ 0"),
    ],
)
def test_init_refuses_flags_a_node_would_refuse_before_writing_anything(tmp_path, flags, words):
    out = tmp_path / "dep"
    done = subprocess.run([*QKDSTACK, "init", "--out", str(out), *flags], capture_output=True, text=True,
                          timeout=TIMEOUT_S)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines() == [done.stderr.strip()] and words in done.stderr
    assert not out.exists()


def test_init_writes_frames_given_as_a_float_flag_as_a_toml_integer(tmp_path):
    """`--pulses-per-frame 1.5e8` (a flag, where floats are the habit) becomes the TOML integer 150000000."""
    out = tmp_path / "dep"
    done = subprocess.run([*QKDSTACK, "init", "--out", str(out), "--pulses-per-frame", "1.5e8",
                           "--base-port", str(free_base_port())], capture_output=True, text=True, timeout=TIMEOUT_S)
    assert done.returncode == 0, done.stderr
    assert "pulses_per_frame = 150000000\n" in (out / "A/site.toml").read_text()
    assert load_config(out / "A/site.toml").device.pulses_per_frame == 150_000_000
