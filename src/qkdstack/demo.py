"""The two-site demonstration behind ``make demo`` and ``qkdstack demo``.

1. ``qkdstack init`` writes a deployment for sites A and B into a fresh folder (PSK bootstrap by
   default, SQLite key stores, free loopback ports).
2. Two ``qkdstack node`` processes start, one per site; they distill keys over a simulated fibre
   (25 km by default) with authenticated post-processing; a line per round shows QBER, key
   length, key rate, store levels and the authentication pool.
3. Two key consumers fetch keys over ETSI GS QKD 014 with mutual TLS: SAE_A at A as master
   (``enc_keys``), SAE_B at B as slave (``dec_keys``); the bytes must be identical.
4. A file is uploaded from A to a file service at B through ``qkdstack tunnel`` (hybrid QKD +
   ML-KEM-768 + X25519 keys, AES-256-GCM, rekeyed from fresh QKD keys); its SHA-256 is checked
   on B's disk.
5. A summary; the processes are stopped and the folder removed. With ``--keep [DIR]`` the folder is
   kept and the nodes keep running (serving keys, their dashboards live) until Ctrl-C.

Each node serves its live dashboard and Prometheus metrics on loopback (``[admin] listen``); the demo
prints their addresses as the nodes start (docs/operations.md).

With an eavesdropper (``--eve intercept-resend:0.3``) every round aborts, and the demo shows
that no key reaches the key store and no key can be delivered.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import http.client
import http.server
import json
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from qkdstack.apps.keysource import Etsi014Client
from qkdstack.apps.tunnel import Tunnel, TunnelConfig
from qkdstack.errors import QKDError
from qkdstack.node.deployment import SiteLayout, default_frame_pulses, write_deployment

SITES = ["A", "B"]


@dataclass
class DemoOptions:
    distance_km: float = 25.0
    bootstrap: str = "psk"
    eve: str = "none"
    rounds: int = 4
    pulses_per_frame: int | None = None
    """None: follows the distance (node/deployment.default_frame_pulses)."""
    keys: int = 4
    file_bytes: int = 256 * 1024
    keep: str | None = None
    timeout_s: float = 600.0
    seed: int | None = None


@dataclass
class DemoResult:
    rounds_accepted: int = 0
    rounds_aborted: int = 0
    secret_bits: int = 0
    qber_z: list[float] = field(default_factory=list)
    key_rate_bit_per_s_device: float = 0.0
    key_rate_bit_per_s_wall: float = 0.0
    real_time_factor: float = 0.0
    """Device seconds distilled per wall second (status.json, over the node's sliding window)."""
    auth_bits_consumed: int = 0
    keys_delivered: int = 0
    keys_match: bool | None = None
    file_ok: bool | None = None
    tunnel_rekeys: int = 0
    tunnel_qkd_bits: int = 0
    aborts: list[str] = field(default_factory=list)
    wall_s: float = 0.0


def ephemeral_port_start() -> int:
    """The first port the kernel hands out as a connection's source port (Linux: ip_local_port_range)."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default, and above the ranges other systems use for listeners


def free_port_block(count: int) -> int:
    """A base port with ``count`` consecutive free ports on 127.0.0.1, below the ephemeral range.

    Free when checked is not enough: the sites bind their ports one after another while the first ones
    already connect out, and an outgoing connection takes a source port from the ephemeral range. A block
    there could be taken before its listener binds it (seen: "[link] quantum 127.0.0.1:42994 cannot be
    listened on (Address already in use)" in the five-site demo), so the block lies below that range.
    """
    low, high = 10000, max(10000 + count + 1, ephemeral_port_start() - count)
    for _ in range(200):
        base = low + secrets.randbelow(high - low)
        try:
            socks = []
            for p in range(base, base + count):
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", p))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise QKDError("no block of free loopback ports found")


def site_status(layout: SiteLayout) -> dict[str, Any] | None:
    path = layout.config.parent / "data" / "status.json"
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def say(text: str) -> None:
    print(text, flush=True)


def _round_line(status: dict[str, Any], peer: dict[str, Any] | None, rounds: int) -> str:
    done = status["rounds_accepted"] + status["rounds_aborted"]
    last = status.get("last_round") or {}
    pool = status.get("auth_pool") or {}
    balance = pool.get("balance_bits") or pool.get("pad_balance_bits") or "?"
    store_a = (status.get("store") or {}).get("stored_keys", 0)
    store_b = ((peer or {}).get("store") or {}).get("stored_keys", 0)
    if last.get("accepted"):
        what = (f"accepted  QBER {100 * last['qber_z']:.2f} %  key {last['key_bits']} bits  "
                f"rate {status['secret_key_rate_bit_per_s_device'] / 1e6:.2f} Mbit/s (device time)  "
                f"real-time factor {status.get('real_time_factor', 0.0):.2f}")
    else:
        what = f"ABORTED in {last.get('stage')}: {last.get('reason')}"
    settle = ("\n      (a round's key enters the stores once the next round has confirmed that both sites hold it)"
              if done == 1 else "")
    return (f"  round {done}/{rounds}  {what}\n"
            f"      store A {store_a} keys / B {store_b} keys (256 bit)  auth consumed "
            f"{status['auth_bits_consumed']} bits, pool {balance} bits{settle}")


def start_nodes(layouts: dict[str, SiteLayout], order: list[str] | None = None) -> dict[str, subprocess.Popen]:
    """A ``qkdstack node`` process per site (``order``: which first; default the receiver, which listens)."""
    procs = {}
    for site in order or list(reversed(SITES)):
        log = open(layouts[site].config.parent / "node.log", "wb")  # noqa: SIM115 - closed with the process
        procs[site] = subprocess.Popen(
            [sys.executable, "-m", "qkdstack.cli", "node", "--config", str(layouts[site].config)],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
    return procs


def stop_nodes(procs: dict[str, subprocess.Popen]) -> None:
    for proc in procs.values():
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    for proc in procs.values():
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def log_tail(layout: SiteLayout, lines: int = 15) -> str:
    path = layout.config.parent / "node.log"
    with contextlib.suppress(FileNotFoundError):
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    return ""


async def _watch_rounds(layouts: dict[str, SiteLayout], procs: dict[str, subprocess.Popen], opts: DemoOptions,
                        result: DemoResult) -> dict[str, Any]:
    """Print a line per finished round until the transmitter has done ``opts.rounds`` and settled."""
    shown = 0
    deadline = time.monotonic() + opts.timeout_s
    while True:
        for site, proc in procs.items():
            if proc.poll() is not None:
                raise QKDError(f"node {site} exited with code {proc.returncode}:\n{log_tail(layouts[site])}")
        status_a, status_b = site_status(layouts["A"]), site_status(layouts["B"])
        if status_a is not None:
            done = status_a["rounds_accepted"] + status_a["rounds_aborted"]
            if done > shown:
                shown = done
                say(_round_line(status_a, status_b, opts.rounds))
            if status_a.get("finished") and status_b is not None and status_b.get("finished"):
                result.rounds_accepted = status_a["rounds_accepted"]
                result.rounds_aborted = status_a["rounds_aborted"]
                result.secret_bits = status_a["secret_bits"]
                result.key_rate_bit_per_s_device = status_a["secret_key_rate_bit_per_s_device"]
                result.key_rate_bit_per_s_wall = status_a["secret_key_rate_bit_per_s_wall"]
                result.real_time_factor = status_a.get("real_time_factor", 0.0)
                result.auth_bits_consumed = status_a["auth_bits_consumed"]
                result.aborts = status_a.get("recent_aborts", [])
                return status_a
        if time.monotonic() > deadline:
            raise QKDError(f"the nodes did not finish {opts.rounds} rounds within {opts.timeout_s:.0f} s")
        await asyncio.sleep(0.3)


def _client(layout: SiteLayout, peer_sae: str) -> Etsi014Client:
    cert, key = layout.sae_cert(layout.sae_ids[0])
    return Etsi014Client(layout.etsi_url, peer_sae, str(cert), str(key), str(layout.ca))


async def _fetch_keys(layouts: dict[str, SiteLayout], opts: DemoOptions, result: DemoResult) -> None:
    sae_a, sae_b = layouts["A"].sae_ids[0], layouts["B"].sae_ids[0]
    async with _client(layouts["A"], sae_b) as master, _client(layouts["B"], sae_a) as slave:
        deadline = time.monotonic() + 30
        while True:  # the KMEs' peer link comes up right after the first stored key
            try:
                keys_a = await master.get_new_keys(opts.keys, 256)
                break
            except QKDError:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.5)
        keys_b = await slave.get_keys_by_id([k.key_id for k in keys_a])
    result.keys_delivered = len(keys_a)
    result.keys_match = [k.key for k in keys_a] == [k.key for k in keys_b]
    say(f"  {sae_a} at A took {len(keys_a)} keys of 256 bits (enc_keys); {sae_b} at B fetched them by ID "
         f"(dec_keys): {'identical' if result.keys_match else 'DIFFERENT'}")
    for k in keys_a[:2]:
        say(f"      key_ID {k.key_id}")


class _UploadHandler(http.server.BaseHTTPRequestHandler):
    """Site B's file service: stores a PUT body under its folder and answers with its SHA-256."""

    folder: Path

    def do_PUT(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        (self.folder / Path(self.path).name).write_bytes(body)
        digest = hashlib.sha256(body).hexdigest().encode()
        self.send_response(201)
        self.send_header("Content-Length", str(len(digest)))
        self.end_headers()
        with contextlib.suppress(ConnectionError):  # the tunnel closed: the demo reports why
            self.wfile.write(digest)

    def log_message(self, *args: Any) -> None:
        pass


def _rekey_interval(file_bytes: int, stored_keys: int) -> int:
    """Bytes per tunnel key: every 64 KiB, or fewer rekeys when a short demo stored few keys.

    The tunnel takes one QKD key to open and one per rekey. With ``stored_keys`` keys in the master's
    direction, one opens the tunnel, one is left spare, and the rest may each carry a share of the file
    (plus a quarter for the HTTP framing): a one-round demo with a couple of keys still sends its file.
    """
    rekeys = max(stored_keys - 2, 1)
    return max(64 * 1024, -(-(file_bytes * 5 // 4) // rekeys))


async def _send_file(layouts: dict[str, SiteLayout], opts: DemoOptions, result: DemoResult, workdir: Path) -> None:
    """Upload a file from site A to site B's file service through the tunnel; check it at B."""
    received = workdir / "site-B-received"
    received.mkdir()
    payload = secrets.token_bytes(opts.file_bytes)
    handler = type("Handler", (_UploadHandler,), {"folder": received})
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    sae_a, sae_b = layouts["A"].sae_ids[0], layouts["B"].sae_ids[0]
    try:
        async with _client(layouts["A"], sae_b) as keys_a, _client(layouts["B"], sae_a) as keys_b:
            rekey_bytes = _rekey_interval(opts.file_bytes, (await keys_a.status())["stored_key_count"])
            exit_end = Tunnel(TunnelConfig("exit", ("127.0.0.1", 0), ("127.0.0.1", httpd.server_address[1]),
                                           rekey_bytes=rekey_bytes), keys_b)
            await exit_end.start()
            entry = Tunnel(TunnelConfig("entry", ("127.0.0.1", 0), ("127.0.0.1", exit_end.port),
                                        rekey_bytes=rekey_bytes), keys_a)
            await entry.start()
            try:
                request = urllib.request.Request(f"http://127.0.0.1:{entry.port}/report.bin", data=payload,
                                                 method="PUT")
                try:
                    answer = await asyncio.to_thread(lambda: urllib.request.urlopen(request, timeout=60).read())
                except (OSError, http.client.HTTPException) as exc:
                    raise QKDError(f"the upload through the tunnel failed ({exc}); the tunnel's log lines above "
                                   "say why") from exc
            finally:
                await entry.close()
                await exit_end.close()
        expected = hashlib.sha256(payload).hexdigest()
        on_disk = hashlib.sha256((received / "report.bin").read_bytes()).hexdigest()
        result.file_ok = answer.decode() == expected == on_disk
        result.tunnel_rekeys = entry.stats.rekeys
        result.tunnel_qkd_bits = entry.stats.qkd_bits_consumed
        say(f"  {len(payload)} bytes from A to B through the tunnel (hybrid QKD + ML-KEM-768 + X25519, "
             f"AES-256-GCM): SHA-256 at B {'matches' if result.file_ok else 'DIFFERS'}; {entry.stats.rekeys} "
             f"rekeys, {entry.stats.qkd_bits_consumed} bits of QKD key")
    finally:
        httpd.shutdown()
        httpd.server_close()


async def _show_no_key(layouts: dict[str, SiteLayout], result: DemoResult) -> None:
    sae_b = layouts["B"].sae_ids[0]
    async with _client(layouts["A"], sae_b) as master:
        try:
            result.keys_delivered = len(await master.get_new_keys(1, 256))
        except QKDError as exc:
            say(f"  ETSI 014 enc_keys at A is refused: {exc}")
    stored = ((site_status(layouts["A"]) or {}).get("store") or {}).get("stored_keys")
    say(f"  key store at A holds {stored} keys: no key was delivered")


def _summary(result: DemoResult, opts: DemoOptions) -> str:
    qber = f"{100 * sum(result.qber_z) / len(result.qber_z):.2f} %" if result.qber_z else "n/a"
    lines = [
        "",
        "summary",
        f"  fibre                     {opts.distance_km:g} km, bootstrap {opts.bootstrap}, eavesdropper {opts.eve}",
        f"  rounds                    {result.rounds_accepted} accepted, {result.rounds_aborted} aborted",
        f"  mean QBER (key basis)     {qber}",
        f"  secret key                {result.secret_bits} bits",
        f"  secret key rate           {result.key_rate_bit_per_s_device:.4g} bit/s of device time, "
        f"{result.key_rate_bit_per_s_wall:.4g} bit/s of wall time (simulation on this machine)",
        f"  real-time factor          {result.real_time_factor:.3f} device seconds distilled per wall second "
        "(1.0: the nodes keep up with their device)",
        f"  authentication key used   {result.auth_bits_consumed} bits "
        f"({100 * result.auth_bits_consumed / max(result.secret_bits, 1):.2f} % of the secret key)",
        f"  keys delivered (ETSI 014) {result.keys_delivered}"
        + ("" if result.keys_match is None else f", identical at both sites: {result.keys_match}"),
    ]
    if result.file_ok is not None:
        lines.append(f"  file through the tunnel   {'intact' if result.file_ok else 'CORRUPTED'} "
                     f"({result.tunnel_rekeys} rekeys, {result.tunnel_qkd_bits} QKD bits)")
    lines.append(f"  wall time                 {result.wall_s:.1f} s")
    return "\n".join(lines)


async def run_demo(opts: DemoOptions) -> DemoResult:
    """Run the whole demonstration; returns its figures (see the module docstring)."""
    start = time.monotonic()
    workdir = Path(opts.keep) if opts.keep else Path(tempfile.mkdtemp(prefix="qkdstack-demo-"))
    result = DemoResult()
    if opts.pulses_per_frame is None:
        opts = replace(opts, pulses_per_frame=default_frame_pulses(opts.distance_km))
    say(f"qkdstack demo: two sites on loopback, {opts.distance_km:g} km of fibre, {opts.bootstrap} bootstrap"
         + ("" if opts.eve == "none" else f", eavesdropper {opts.eve}"))
    layouts = write_deployment(workdir, SITES, bootstrap=opts.bootstrap, base_port=free_port_block(14),
                               distance_km=opts.distance_km, pulses_per_frame=opts.pulses_per_frame,
                               rounds=opts.rounds, eve=opts.eve, seed=opts.seed)
    say(f"  deployment written to {workdir} (site A transmitter, site B receiver)")
    procs = start_nodes(layouts)
    try:
        say(f"  nodes started (pids {procs['A'].pid}, {procs['B'].pid}); distilling {opts.rounds} rounds of "
             f"{opts.pulses_per_frame:.3g} pulses")
        say(f"  live dashboard: {layouts['A'].admin_url}/ (site A), {layouts['B'].admin_url}/ (site B); "
             f"metrics at .../metrics")
        await _watch_rounds(layouts, procs, opts, result)
        result.qber_z = _qbers(layouts["A"])
        if result.rounds_accepted:
            await _fetch_keys(layouts, opts, result)
            await _send_file(layouts, opts, result, workdir)
        else:
            await _show_no_key(layouts, result)
        if opts.keep is not None:
            result.wall_s = time.monotonic() - start
            await _linger(layouts, procs, workdir, result, opts)
    finally:
        stop_nodes(procs)
        result.wall_s = time.monotonic() - start
        if opts.keep is None:
            shutil.rmtree(workdir, ignore_errors=True)
    if opts.keep is None:
        say(_summary(result, opts))
    return result


async def _linger(layouts: dict[str, SiteLayout], procs: dict[str, subprocess.Popen], workdir: Path,
                  result: DemoResult, opts: DemoOptions) -> None:
    """``--keep``: print the summary, then keep the nodes running for a look until Ctrl-C (or a node exits)."""
    say(_summary(result, opts))
    say(f"\nthe nodes keep running (deployment in {workdir}); they serve keys over ETSI 014 and their "
         f"dashboards stay live:\n  site A {layouts['A'].admin_url}/\n  site B {layouts['B'].admin_url}/\n"
         f"  both sites: qkdstack dashboard --deployment {workdir}\nCtrl-C stops them.")
    try:
        while all(proc.poll() is None for proc in procs.values()):
            await asyncio.sleep(0.5)
    except asyncio.CancelledError:  # Ctrl-C: stop the nodes (the caller's finally), exit normally
        say("\nstopping the nodes")


def _qbers(layout: SiteLayout) -> list[float]:
    """Key-basis QBER of each accepted round, from the node's log of round outcomes."""
    path = layout.config.parent / "data" / "rounds.jsonl"
    out = []
    with contextlib.suppress(FileNotFoundError):
        for line in path.read_text().splitlines():
            doc = json.loads(line)
            if doc.get("accepted"):
                out.append(doc["qber_z"])
    return out


def demo_ok(result: DemoResult, opts: DemoOptions) -> bool:
    """Did the demo show what it should? Keys and file intact, or, with Eve, no key delivered."""
    if opts.eve != "none":
        return result.keys_delivered == 0
    return bool(result.rounds_accepted and result.keys_match and result.file_ok)
