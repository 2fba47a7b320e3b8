"""The live dashboard: one static page, and ``qkdstack dashboard --deployment DIR`` over every site.

The page (``static/dashboard.html``) is plain HTML with a few hundred lines of vanilla JavaScript and
no external resource (no CDN, no library): it polls ``status.json`` and ``rounds.json`` every two
seconds and draws, per site, the QBER of the last rounds (both bases) against the abort threshold as
inline SVG, the key rates, the key store level against its capacity and water marks, the
authentication pool, and the recent aborts as alarms; above, the links of the deployment as a small
map. Every text from the node (abort reasons, names) is set with ``textContent``, never as HTML.

The same page is served by each node's admin listener (:mod:`qkdstack.ops.admin`, one site) and by
:func:`serve_deployment`, which reads each site's ``data/status.json`` and ``data/rounds.jsonl`` from a
deployment folder written by ``qkdstack init`` (all sites of the deployment on one page).
"""

from __future__ import annotations

import json
import logging
import threading
from importlib import resources
from pathlib import Path
from typing import Any

from qkdstack.errors import ConfigError
from qkdstack.node.config import NodeConfig
from qkdstack.ops.metrics import RoundHistory

log = logging.getLogger("qkdstack.ops.dashboard")


def page() -> bytes:
    """The dashboard page (static; its data comes from ``status.json`` and ``rounds.json``)."""
    return resources.files("qkdstack.ops").joinpath("static/dashboard.html").read_bytes()


def ops_figures(config: NodeConfig) -> dict[str, Any]:
    """Configured figures the dashboard and the metrics need besides the status document (no secrets)."""
    return {
        "max_qber": config.protocol.max_qber,
        "max_phase_error": config.protocol.max_phase_error,
        "capacity_keys": config.kms.capacity_keys,
        "high_water_keys": config.kms.high_water_keys,
        "low_water_keys": config.kms.low_water_keys,
    }


class DeploymentView:
    """The sites of a deployment folder (``DIR/<site>/site.toml``), read from their files at each request."""

    def __init__(self, folder: str | Path) -> None:
        from qkdstack.node.site_config import load_site_config

        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise ConfigError(f"--deployment {self.folder} is not a folder")
        configs = sorted(self.folder.glob("*/site.toml"))
        if not configs:
            raise ConfigError(f"--deployment {self.folder} holds no <site>/site.toml (write one with qkdstack init)")
        self.sites: dict[str, tuple[NodeConfig, RoundHistory, Path]] = {}
        for path in configs:  # a site of a network: its first link's history, the site's own status.json
            site = load_site_config(path, check_files=False)
            config = site.first
            self.sites[site.name] = (config, RoundHistory(config.data_dir / "rounds.jsonl"),
                                     site.data_dir / "status.json")
        self._lock = threading.Lock()

    def status(self) -> dict[str, Any]:
        docs = []
        for name, (config, _, path) in self.sites.items():
            try:
                doc = json.loads(path.read_text())
            except FileNotFoundError:
                doc = {"site": name, "role": config.site.role, "link": "-".join(sorted((name, config.site.peer))),
                       "rounds_accepted": 0, "rounds_aborted": 0, "note": "not started yet"}
            except (OSError, ValueError) as exc:  # being replaced, unreadable: say so, keep serving
                doc = {"site": name, "role": config.site.role, "rounds_accepted": 0, "rounds_aborted": 0,
                       "note": f"status.json unreadable ({type(exc).__name__})"}
            doc["ops"] = ops_figures(config)
            docs.append(doc)
        return {"title": f"deployment {self.folder.name}: sites {', '.join(self.sites)}", "sites": docs}

    def rounds(self, site: str | None, limit: int) -> dict[str, Any]:
        name = site if site in self.sites else next(iter(self.sites))
        return {"site": name, "rounds": self.sites[name][1].last(limit)}


def serve_deployment(folder: str | Path, listen: str = "127.0.0.1:8470", token: str = "") -> Any:
    """Start the deployment dashboard's listener (returns the started :class:`~qkdstack.ops.admin.AdminServer`)."""
    from qkdstack.ops.admin import AdminApp, AdminServer, check_admin

    address = check_admin(listen, token)
    if address is None:
        raise ConfigError("--listen must be HOST:PORT")
    view = DeploymentView(folder)
    app = AdminApp(page=page, status=view.status, rounds=view.rounds)
    return AdminServer(*address, app, token=token).start()
