"""``qkdstack demo`` prints the dashboards, and ``--keep`` keeps the nodes running for a look until Ctrl-C."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

pytestmark = pytest.mark.slow


def test_demo_keep_leaves_the_nodes_and_dashboards_running_until_ctrl_c(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    proc = subprocess.Popen(
        [sys.executable, "-m", "qkdstack.cli", "demo", "--rounds", "1", "--pulses-per-frame", "1e8",
         "--keep", str(out)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    lines: list[str] = []
    try:
        deadline = time.monotonic() + 300
        assert proc.stdout is not None
        while not any("Ctrl-C stops them" in line for line in lines):
            line = proc.stdout.readline()
            assert line or proc.poll() is None, "".join(lines)
            lines.append(line)
            assert time.monotonic() < deadline, "".join(lines)
        text = "".join(lines)
        urls = re.findall(r"live dashboard: (http://127\.0\.0\.1:\d+)/ \(site A\), (http://127\.0\.0\.1:\d+)/", text)
        assert urls, text
        assert "identical at both sites: True" in text and "rounds                    1 accepted" in text
        assert f"qkdstack dashboard --deployment {out}" in text
        time.sleep(1.0)
        assert proc.poll() is None  # still running: the nodes serve keys and dashboards
        for url in urls[0]:
            with urllib.request.urlopen(url + "/metrics", timeout=10) as answer:
                body = answer.read().decode()
            names = {f.name for f in text_string_to_metric_families(body)}
            assert "qkdstack_qber_ratio" in names and "qkdstack_rounds_accepted" in names
            with urllib.request.urlopen(url + "/", timeout=10) as answer:
                assert b"qber-chart" in answer.read()
        proc.send_signal(signal.SIGINT)
        rest, _ = proc.communicate(timeout=60)
        assert proc.returncode == 0, text + rest
        assert "stopping the nodes" in rest
        for url in urls[0]:  # the nodes are stopped
            with pytest.raises((urllib.error.URLError, ConnectionError)):
                urllib.request.urlopen(url + "/metrics", timeout=2)
        assert (out / "A" / "site.toml").exists()  # the deployment is kept
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
