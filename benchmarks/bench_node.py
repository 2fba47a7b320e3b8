"""Two ``qkdstack node`` processes on loopback: real-time factor, key rate, CPU and peak RSS (issue 12).

A deployment as ``qkdstack init`` writes it (PSK, SQLite, frames that follow the distance) for each case of
``QKDSTACK_BENCH_NODE_KM``: ``KM`` (a 1 GHz source) or ``KM@GHZ`` (the source's ``[device] rep_rate_hz`` in
GHz, the frame chosen by :func:`qkdstack.theory.frames.frame_pulses` for that source: 10^9 pulses, 0.4 s, at
2.5 GHz); default ``10,25,50,25@2.5``, the cases of issue 12; ``QKDSTACK_BENCH_NODE_RECONCILIATION``
(``ldpc`` or ``cascade``) sets both sites' ``[protocol] reconciliation`` (default: the deployment's, Cascade).
After a warm-up (the first accepted rounds, Numba's compilation), the steady state is measured for
``QKDSTACK_BENCH_NODE_SECONDS`` (default 60) from the sites' ``status.json``:

* ``real_time_factor``: device seconds distilled per wall second, ``Δ device_seconds_distilled / Δ wall``
  at site A (1.0: the nodes keep up with their device);
* ``secret_bit_per_s_wall``: ``Δ secret_bits / Δ wall`` at site A;
* ``cpu_s`` (and its ``user_system_s`` split) and ``peak_rss_mib`` (VmHWM) of each process, and the
  machine's load average (the machine may be shared: both nodes and anything else running compete for its
  cores);
* ``stage_seconds_mean``: per site, the mean wall time of each stage of the rounds accepted in the window
  (``stage_seconds`` in ``data/rounds.jsonl``): where a round's time goes.

``--profile KM[@GHZ] [--seconds S] [--out DIR]`` (outside ``make bench``; needs ``pip install py-spy``): one
case, measured unprofiled for S seconds (default 30), then both node processes sampled by py-spy for S more
seconds (``py-spy record --nonblocking -r 50 -t -f raw``, once for the threads that are not idle and once
with ``--gil`` for the thread holding the GIL), raw profiles written to DIR; prints the measurement, the
factor while profiled (sampling costs CPU), and the top functions by share of samples (docs/performance.md).

Key stores are sized so that generation never pauses for a full store during the run.
Run: ``.venv/bin/python benchmarks/run_all.py node`` or ``benchmarks/bench_node.py --minutes 10`` (one
long run at 25 km, RSS sampled each minute, to check that memory stays flat).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path
from typing import Any

SECONDS = float(os.environ.get("QKDSTACK_BENCH_NODE_SECONDS", "60"))
CASES = os.environ.get("QKDSTACK_BENCH_NODE_KM", "10,25,50,25@2.5")
"""Comma-separated ``KM`` or ``KM@GHZ`` (see the module doc)."""
RECONCILIATION = os.environ.get("QKDSTACK_BENCH_NODE_RECONCILIATION", "")
"""``ldpc`` or ``cascade`` for both sites, or empty: the deployment's own (Cascade)."""
WARMUP_ROUNDS = 3
WARMUP_TIMEOUT_S = 240.0


def _base_port() -> int:
    for base in range(31100, 60000, 131):
        ok = True
        for port in range(base, base + 16):
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", port))
                except OSError:
                    ok = False
                    break
        if ok:
            return base
    raise RuntimeError("no free ports on loopback")


def _status(site_dir: Path) -> dict[str, Any]:
    try:
        return json.loads((site_dir / "data" / "status.json").read_text())
    except (OSError, ValueError):
        return {}


def _proc(pid: int) -> tuple[float, float]:
    """(CPU seconds, peak RSS in MiB) of a process (Linux /proc)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    cpu = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    hwm = 0.0
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                hwm = int(line.split()[1]) / 1024
    return cpu, hwm


def _user_system_s(pid: int) -> list[float]:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return [int(fields[11]) / os.sysconf("SC_CLK_TCK"), int(fields[12]) / os.sysconf("SC_CLK_TCK")]


def _stage_means(site_dir: Path, t0: float, t1: float) -> dict[str, float]:
    """Mean ``stage_seconds`` of the rounds accepted between ``t0`` and ``t1`` (Unix times), from rounds.jsonl."""
    totals: dict[str, float] = collections.defaultdict(float)
    n = 0
    path = site_dir / "data" / "rounds.jsonl"
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            doc = json.loads(line)
        except ValueError:
            continue
        if doc.get("accepted") and t0 <= doc.get("time", 0) <= t1:
            n += 1
            for stage, sec in (doc.get("stage_seconds") or {}).items():
                if isinstance(sec, (int, float)):
                    totals[stage] += sec
    return {stage: round(total / n, 4) for stage, total in totals.items()} if n else {}


def _frame_name(frame: str) -> str:
    """``func (path/to/file.py:123)`` -> ``func (qkdstack/file.py)``: one name per function."""
    m = re.match(r"(.*) \((.*?)(?::\d+)?\)$", frame)
    if not m:
        return frame
    path = m.group(2).split("site-packages/")[-1].split("src/")[-1]
    return f"{m.group(1)} ({path})"


def profile_summary(raw: Path, top: int = 12) -> dict[str, Any]:
    """Shares of samples in a py-spy raw profile (``-t``: each stack starts with its thread): per thread, per
    function where the sample was taken (self), and per innermost qkdstack function on the stack (the one of
    ours that was running, or that called the library or C code that was: numpy, sqlite3, uuid, asyncio)."""
    threads: collections.Counter[str] = collections.Counter()
    own: collections.Counter[str] = collections.Counter()
    ours: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n, frames = int(count), stack.split(";")
        total += n
        threads[frames[0].split(": ", 1)[-1]] += n
        own[_frame_name(frames[-1])] += n
        names = [_frame_name(f) for f in frames[1:]]
        ours[next((name for name in reversed(names) if "(qkdstack/" in name), "(not in qkdstack)")] += n

    def shares(counter: collections.Counter[str], k: int) -> list[list[Any]]:
        return [[round(100 * n / total, 1), name] for name, n in counter.most_common(k)] if total else []

    return {"samples": total, "threads_pct": shares(threads, 8), "self_pct": shares(own, top),
            "innermost_qkdstack_pct": shares(ours, top)}


def py_spy(pids: dict[str, int], seconds: float, out_dir: Path) -> dict[str, Any]:
    """Sample each process with py-spy for ``seconds`` (non-idle threads, and the GIL holder), both at once."""
    exe = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    out_dir.mkdir(parents=True, exist_ok=True)
    jobs = {}
    for site, pid in pids.items():
        for kind, extra in (("active", []), ("gil", ["--gil"])):
            path = out_dir / f"{site}-{kind}.txt"
            cmd = [exe, "record", "--nonblocking", "-r", "50", "-d", str(round(seconds)), "-t", "-f", "raw",
                   *extra, "-o", str(path), "--pid", str(pid)]
            jobs[(site, kind, path)] = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    result: dict[str, Any] = {}
    for (site, kind, path), job in jobs.items():
        _, err = job.communicate(timeout=seconds + 60)
        if job.returncode != 0 or not path.exists():
            raise RuntimeError(f"py-spy failed on {site}: {err.decode(errors='replace')[-500:]}")
        result.setdefault(site, {})[kind] = {"raw": str(path), **profile_summary(path)}
    return result


def _rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def _device_s(st: dict[str, Any], frame_s: float) -> float:
    """Device seconds distilled so far (status.json; from the accepted rounds for nodes that predate the field)."""
    if "device_seconds_distilled" in st:
        return float(st["device_seconds_distilled"])
    return st.get("rounds_accepted", 0) * frame_s


def start_nodes(layouts: dict[str, Any], root: Path, procs: dict[str, subprocess.Popen],
                logs: dict[str, Any]) -> None:
    """Start ``qkdstack node`` for B then A, logging to ``root/SITE.log``; fills ``procs`` and ``logs`` as it goes
    (so that :func:`stop_nodes` stops whatever did start)."""
    exe = str(Path(sys.executable).with_name("qkdstack"))
    for site in ("B", "A"):
        logs[site] = open(root / f"{site}.log", "wb")  # noqa: SIM115 - closed by stop_nodes
        procs[site] = subprocess.Popen([exe, "node", "--config", str(layouts[site].config)],
                                       stdout=logs[site], stderr=subprocess.STDOUT)


def stop_nodes(procs: dict[str, subprocess.Popen], logs: dict[str, Any]) -> None:
    """SIGTERM the benchmark's node processes, wait (SIGKILL after 30 s) and close their log files."""
    for p in procs.values():
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for p in procs.values():
        try:
            p.wait(30)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
    for f in logs.values():
        with contextlib.suppress(OSError):
            f.close()


def parse_cases(text: str) -> list[tuple[float, float]]:
    """``"10,25@2.5"`` -> ``[(10.0, 1e9), (25.0, 2.5e9)]``: (distance in km, repetition rate in Hz)."""
    cases = []
    for item in text.split(","):
        km, _, ghz = item.strip().partition("@")
        cases.append((float(km), float(ghz or 1.0) * 1e9))
    return cases


def frame_pulses(distance_km: float, rep_rate_hz: float = 1e9) -> int:
    """The frame that follows the distance for this source (``qkdstack init``'s at 1 GHz: 4e8 pulses up to 50 km),
    or QKDSTACK_BENCH_NODE_FRAME."""
    from dataclasses import replace

    from qkdstack.node.deployment import default_frame_pulses
    from qkdstack.physics.params import DeviceParams
    from qkdstack.theory.frames import frame_pulses as theory_frame_pulses

    override = os.environ.get("QKDSTACK_BENCH_NODE_FRAME")
    if override:
        return int(float(override))
    if rep_rate_hz == 1e9:
        return default_frame_pulses(distance_km)
    p = DeviceParams()
    return theory_frame_pulses(replace(p, channel=replace(p.channel, length_km=float(distance_km)),
                                       source=replace(p.source, rep_rate_hz=float(rep_rate_hz))))


def measure(distance_km: float, seconds: float, *, rss_every_s: float = 0.0, rep_rate_hz: float = 1e9,
            profile_dir: Path | None = None) -> dict[str, Any]:
    """Run two nodes at ``distance_km`` with a ``rep_rate_hz`` source and measure ``seconds`` of steady state.

    ``profile_dir``: then sample both processes with py-spy for ``seconds`` more (:func:`py_spy`)."""
    from qkdstack.node.deployment import render_toml, write_deployment

    with tempfile.TemporaryDirectory(prefix="qkdstack-bench-node-") as tmp:
        root = Path(tmp)
        layouts = write_deployment(root / "dep", ["A", "B"], bootstrap="psk", base_port=_base_port(),
                                   distance_km=distance_km,
                                   pulses_per_frame=frame_pulses(distance_km, rep_rate_hz))
        for layout in layouts.values():
            data = tomllib.loads(layout.config.read_text())
            if rep_rate_hz != 1e9:
                data["device"]["rep_rate_hz"] = rep_rate_hz
            data["kms"].update(capacity_keys=5_000_000, high_water_keys=4_900_000, low_water_keys=1_000)
            if RECONCILIATION:
                data.setdefault("protocol", {})["reconciliation"] = RECONCILIATION
            layout.config.write_text(render_toml(data))
        dirs = {s: layouts[s].config.parent for s in ("A", "B")}
        dev = tomllib.loads(layouts["A"].config.read_text())["device"]
        frame_s = float(dev.get("pulses_per_frame", 1e8)) / float(dev.get("rep_rate_hz", 1e9))
        procs: dict[str, subprocess.Popen] = {}
        logs: dict[str, Any] = {}
        try:
            start_nodes(layouts, root, procs, logs)
            deadline = time.monotonic() + WARMUP_TIMEOUT_S
            while _status(dirs["A"]).get("rounds_accepted", 0) < WARMUP_ROUNDS:
                if any(p.poll() is not None for p in procs.values()):
                    raise RuntimeError("a node exited during warm-up: " + (root / "A.log").read_text()[-2000:])
                if time.monotonic() > deadline:
                    raise RuntimeError("no rounds accepted within the warm-up time")
                time.sleep(0.5)
            s0, w0 = _status(dirs["A"]), time.time()
            c0 = {s: _proc(p.pid)[0] for s, p in procs.items()}
            u0 = {s: _user_system_s(p.pid) for s, p in procs.items()}
            rss: list[dict[str, float]] = []
            end = time.monotonic() + seconds
            while time.monotonic() < end:
                time.sleep(min(rss_every_s or seconds, max(0.0, end - time.monotonic())))
                if rss_every_s:
                    rss.append({s: round(_rss_mib(p.pid), 1) for s, p in procs.items()})
            s1, w1 = _status(dirs["A"]), time.time()
            wall = w1 - w0
            out: dict[str, Any] = {
                "distance_km": distance_km,
                "rep_rate_hz": rep_rate_hz,
                "pulses_per_frame": int(dev.get("pulses_per_frame", 0)),
                "reconciliation": RECONCILIATION or "cascade (the default)",
                "seconds": round(wall, 1),
                "rounds_accepted": s1["rounds_accepted"] - s0["rounds_accepted"],
                "rounds_aborted": s1["rounds_aborted"] - s0["rounds_aborted"],
                "real_time_factor": round((_device_s(s1, frame_s) - _device_s(s0, frame_s)) / wall, 3),
                "secret_bit_per_s_wall": round((s1["secret_bits"] - s0["secret_bits"]) / wall),
                "secret_bit_per_s_device": round(s1["secret_key_rate_bit_per_s_device"]),
                "cpu_s": {s: round(_proc(p.pid)[0] - c0[s], 1) for s, p in procs.items()},
                "user_system_s": {s: [round(x - y, 1) for x, y in zip(_user_system_s(p.pid), u0[s], strict=True)]
                                  for s, p in procs.items()},
                "stage_seconds_mean": {s: _stage_means(d, w0, w1) for s, d in dirs.items()},
                "peak_rss_mib": {s: round(_proc(p.pid)[1], 1) for s, p in procs.items()},
                "load_average_1_5_15": [round(x, 2) for x in os.getloadavg()],
                "cpu_count": os.cpu_count(),
            }
            if rss:
                out["rss_mib_each_interval"] = rss
            if profile_dir is not None:
                s2, w2 = _status(dirs["A"]), time.time()
                out["profile"] = py_spy({s: p.pid for s, p in procs.items()}, seconds, profile_dir)
                s3, w3 = _status(dirs["A"]), time.time()
                out["real_time_factor_while_profiled"] = round((_device_s(s3, frame_s) - _device_s(s2, frame_s))
                                                               / (w3 - w2), 3)
            return out
        finally:
            stop_nodes(procs, logs)


def run() -> dict:
    return {"target": "real_time_factor >= 1.0 at 25 and 50 km, 1 GHz (issue 12)",
            "runs": [measure(km, SECONDS, rep_rate_hz=rate) for km, rate in parse_cases(CASES)]}


def cli(argv: list[str]) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, help="one long run at 25 km, RSS sampled each minute")
    parser.add_argument("--profile", metavar="KM[@GHZ]", help="one case, then py-spy on both nodes")
    parser.add_argument("--seconds", type=float, default=30.0, help="with --profile: measured and profiled time")
    parser.add_argument("--out", default="bench-node-profile", help="with --profile: folder for the raw profiles")
    args = parser.parse_args(argv)
    if args.minutes:
        return measure(25.0, 60 * args.minutes, rss_every_s=60.0)
    if args.profile:
        ((km, rate),) = parse_cases(args.profile)
        return measure(km, args.seconds, rep_rate_hz=rate, profile_dir=Path(args.out))
    return run()


if __name__ == "__main__":
    print(json.dumps(cli(sys.argv[1:]), indent=2))
