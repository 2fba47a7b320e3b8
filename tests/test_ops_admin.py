"""The admin listener: loopback unless a token is configured, the token required when set, one-sentence errors."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from _node_support import deploy, edit_config
from qkdstack.errors import ConfigError
from qkdstack.node.config import check_listen_addresses, load_config
from qkdstack.ops.admin import AdminApp, AdminServer
from qkdstack.ops.metrics import NodeMetrics

TOKEN = "s3cret-admin-token-0123456789abcdef"
STATUS = {
    "site": "A", "role": "transmitter", "link": "A-B", "updated": 1.5e9, "finished": False,
    "rounds_accepted": 3, "rounds_aborted": 1, "secret_bits": 1000,
    "secret_key_rate_bit_per_s_wall": 10.0, "secret_key_rate_bit_per_s_device": 1e5,
    "last_round": {"accepted": True, "qber_z": 0.01, "qber_x": 0.012, "phase_error_bound": 0.1,
                   "leakage_bits": {"cascade": 300, "verification": 20}, "key_bits": 500},
    "auth_bits_consumed": 768, "auth_pool": {"balance_bits": 4096}, "store": {"stored_keys": 7, "key_size_bits": 256},
}


def _get(url: str, token: str | None = None) -> tuple[int, bytes]:
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=10) as answer:
            return answer.status, answer.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def _app() -> AdminApp:
    metrics = NodeMetrics(lambda: STATUS, site="A")
    return AdminApp(page=lambda: b"<html>page</html>", status=lambda: {"sites": [STATUS]},
                    rounds=lambda site, limit: {"site": "A", "rounds": []}, metrics=metrics.exposition)


@pytest.mark.parametrize("listen", ["0.0.0.0:9464", "192.0.2.7:9464", "[::]:9464", "example.com:9464"])
def test_non_loopback_listen_without_token_is_a_config_error_naming_the_field(tmp_path: Path, listen: str) -> None:
    layouts = deploy(tmp_path / "dep", rounds=1)
    edit_config(layouts["A"].config, admin={"listen": listen})
    with pytest.raises(ConfigError) as err:
        load_config(layouts["A"].config)
    message = str(err.value)
    assert "[admin] listen" in message and "token" in message and "\n" not in message
    edit_config(layouts["A"].config, admin={"listen": listen, "token": TOKEN})
    config = load_config(layouts["A"].config)
    assert config.admin.listen == listen
    assert TOKEN not in repr(config)  # the token is a secret: never in a repr


def test_short_token_is_refused(tmp_path: Path) -> None:
    layouts = deploy(tmp_path / "dep", rounds=1)
    edit_config(layouts["A"].config, admin={"token": "short"})
    with pytest.raises(ConfigError, match=r"\[admin\] token must be at least 16 characters"):
        load_config(layouts["A"].config)


def test_node_cli_refuses_non_loopback_admin_with_exit_2_and_one_line(tmp_path: Path) -> None:
    layouts = deploy(tmp_path / "dep", rounds=1)
    edit_config(layouts["B"].config, admin={"listen": "0.0.0.0:0"})
    proc = subprocess.run([sys.executable, "-m", "qkdstack.cli", "node", "--config", str(layouts["B"].config)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "[admin] listen 0.0.0.0:0 is not a loopback address" in lines[0], proc.stderr
    assert not (layouts["B"].config.parent / "data" / "status.json").exists()


def test_busy_admin_port_is_a_config_error(tmp_path: Path) -> None:
    layouts = deploy(tmp_path / "dep", rounds=1)
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        edit_config(layouts["A"].config, admin={"listen": f"127.0.0.1:{port}"})
        config = load_config(layouts["A"].config)
        with pytest.raises(ConfigError, match=r"\[admin\] listen 127\.0\.0\.1:\d+ cannot be listened on"):
            check_listen_addresses(config)
        with pytest.raises(ConfigError, match=r"\[admin\] listen"):
            AdminServer("127.0.0.1", port, _app()).start()


def test_admin_server_refuses_non_loopback_bind_without_token() -> None:
    with pytest.raises(ConfigError, match=r"\[admin\] listen 0\.0\.0\.0:0 is not a loopback address"):
        AdminServer("0.0.0.0", 0, _app())


def test_token_is_required_on_every_data_path_when_set() -> None:
    with AdminServer("127.0.0.1", 0, _app(), token=TOKEN) as server:
        for path in ("/metrics", "/status.json", "/rounds.json"):
            assert _get(server.url + path)[0] == 401
            assert _get(server.url + path, token="wrong-" + TOKEN)[0] == 401
            assert _get(server.url + path, token=TOKEN[:-1])[0] == 401
            code, body = _get(server.url + path, token=TOKEN)
            assert code == 200, path
            assert TOKEN.encode() not in body
        code, body = _get(server.url + "/metrics", token=TOKEN)
        names = {f.name for f in text_string_to_metric_families(body.decode())}
        assert {"qkdstack_rounds_accepted", "qkdstack_qber_ratio", "qkdstack_etsi014_requests"} <= names
        assert json.loads(_get(server.url + "/status.json", token=TOKEN)[1])["sites"][0]["site"] == "A"
        # The page holds no data; its script sends the token from the address's fragment.
        assert _get(server.url + "/")[0] == 200
        assert _get(server.url + "/nothing", token=TOKEN)[0] == 404
    # A non-loopback bind is allowed with a token, and still requires it.
    with AdminServer("0.0.0.0", 0, _app(), token=TOKEN) as server:
        url = f"http://127.0.0.1:{server.port}"
        assert _get(url + "/metrics")[0] == 401
        assert _get(url + "/metrics", token=TOKEN)[0] == 200


def test_without_token_loopback_serves_data() -> None:
    with AdminServer("127.0.0.1", 0, _app()) as server:
        code, body = _get(server.url + "/metrics")
        assert code == 200
        samples = {s.name: s.value for f in text_string_to_metric_families(body.decode()) for s in f.samples
                   if not s.labels.get("basis") or s.labels["basis"] == "X"}
        assert samples["qkdstack_rounds_accepted_total"] == 3
        assert samples["qkdstack_qber_ratio"] == 0.012
        assert samples["qkdstack_rounds_aborted_total"] == 1
