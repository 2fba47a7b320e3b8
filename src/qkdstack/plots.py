"""The figures of ``keyrate --plot``, ``simulate --plot`` and ``distill --plot`` (docs/cli.md, "Pictures").

Each figure is made in two steps: a ``*_data`` function turns the command's result (the same
record ``--json`` prints) into plain lists of numbers, and a ``*_figure`` function draws those
numbers into a file and returns them. Tests check the numbers; the picture shows the same ones.

matplotlib is an optional dependency (``pip install 'qkdstack[plot]'``) and is imported here only,
when a figure is drawn: a :class:`matplotlib.figure.Figure` on the Agg canvas, without pyplot, so
no global backend is switched (a notebook that imports :mod:`qkdstack` keeps its own).
:func:`require_matplotlib` is called by each command before any computation, so a missing
matplotlib costs one sentence and exit code 2, not a computation thrown away.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Any

from qkdstack.errors import ConfigError

EXTRA = "plot"
"""The optional-dependency group (pyproject.toml) that installs matplotlib."""

MIN_DETECTIONS_FOR_RATIO = 20
"""``simulate --plot`` draws measured/expected gain only for cells with at least this many detections
(the vacuum decoy's handful of dark counts would make a bar of pure noise)."""


def require_matplotlib(flag: str = "--plot") -> None:
    """Raise :class:`ConfigError` (exit code 2) naming ``flag`` and the extra to install if matplotlib is missing."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise ConfigError(f"{flag} needs matplotlib, which is not installed; install it with "
                          f"pip install 'qkdstack[{EXTRA}]' (or pip install matplotlib)") from None


def _figure(width: float, height: float, rows: int = 1, cols: int = 1, sharex: bool = False) -> tuple[Any, Any]:
    """A figure on the Agg canvas (no pyplot) and its axes."""
    require_matplotlib()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, cols, squeeze=False, sharex=sharex)
    return fig, axes


def _save(fig: Any, path: str) -> None:
    try:
        fig.savefig(path, dpi=120)
    except OSError as exc:
        raise ConfigError(f"--plot: cannot write {path}: {exc.strerror or exc}") from None


def _finite(x: float | None) -> bool:
    return x is not None and math.isfinite(x)


# ------------------------------------------------------------------------------------------ keyrate


def curve_label(method: str, block_size: float | None) -> str:
    """``lim2014, n_X = 1e+06`` or ``infinite, asymptotic``: one curve of ``keyrate``."""
    return f"{method}, " + (f"n_X = {block_size:.3g}" if block_size else "asymptotic")


def keyrate_data(curves: list[dict[str, Any]], plob_km: list[float], plob_bound: list[float],
                 optimize: bool) -> dict[str, Any]:
    """What ``keyrate --plot`` draws.

    ``curves``: one per (method, block size), each with ``method``, ``block_size``,
    ``max_distance_km`` and ``points`` (the rows of :func:`qkdstack.commands.keyrate.rate_rows`).
    ``plob_km``, ``plob_bound``: the PLOB bound −log2(1 − η) (Pirandola et al., Nat. Commun. 8,
    15043 (2017), Eq. (1)) on a fine grid of lengths. Returns the title, each curve's distances and
    rates (only the positive ones can be drawn on a log scale; ``no_key`` marks a curve with none) and
    ``note``, the sentence written into the figure when a curve has no key at any distance.
    """
    out_curves = []
    for c in curves:
        pts = c["points"]
        out_curves.append({
            "label": curve_label(c["method"], c["block_size"]),
            "method": c["method"],
            "block_size": c["block_size"],
            "distance_km": [p["distance_km"] for p in pts],
            "rate_per_pulse": [p["rate_per_pulse"] for p in pts],
            "max_distance_km": c["max_distance_km"],
            "no_key": not any(p["rate_per_pulse"] > 0 for p in pts),
        })
    methods = sorted({c["method"] for c in curves}, key=[c["method"] for c in curves].index)
    blocks = [c["block_size"] for c in curves if c["block_size"]]
    block_text = ("block n_X = " + ", ".join(f"{b:.3g}" for b in blocks)) if blocks else "asymptotic"
    if blocks and any(not c["block_size"] for c in curves):
        block_text += " and asymptotic"
    title = (f"Decoy-state BB84 key rate: {', '.join(methods)}; {block_text}; "
             + ("intensities optimised per distance" if optimize else "fixed intensities"))
    empty = [c["label"] for c in out_curves if c["no_key"]]
    note = None
    if empty:
        note = "no key at any distance plotted: " + "; ".join(empty)
    return {"title": title, "curves": out_curves,
            "plob": {"distance_km": list(plob_km), "bound_per_pulse": list(plob_bound)}, "note": note}


def keyrate_figure(path: str, data: dict[str, Any]) -> dict[str, Any]:
    """Draw :func:`keyrate_data`'s ``data`` (log-scale rate per pulse vs length) into ``path``; return ``data``."""
    fig, axes = _figure(7.5, 4.8)
    ax = axes[0][0]
    for c in data["curves"]:
        pos = [(x, y) for x, y in zip(c["distance_km"], c["rate_per_pulse"], strict=True) if y > 0]
        label = c["label"] + (" (no key)" if c["no_key"] else "")
        line = None
        if pos:
            (line,) = ax.semilogy([p[0] for p in pos], [p[1] for p in pos], "o-", ms=3, label=label)
        else:
            ax.plot([], [], "o-", label=label)
        m = c["max_distance_km"]
        if _finite(m):
            ax.axvline(m, color=line.get_color() if line is not None else "grey", lw=0.8, ls=":")
    grid = [(x, y) for x, y in zip(data["plob"]["distance_km"], data["plob"]["bound_per_pulse"], strict=True)
            if _finite(y) and y > 0]
    if grid:
        ax.semilogy([g[0] for g in grid], [g[1] for g in grid], "k--", lw=1, label="PLOB bound −log₂(1−η)")
    ax.set_yscale("log")
    ax.set_xlabel("fibre length (km)")
    ax.set_ylabel("secret key rate (bit/pulse)")
    ax.set_title(data["title"], fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    if data["note"]:
        ax.text(0.5, 0.5, data["note"], transform=ax.transAxes, ha="center", va="center", fontsize=10,
                color="firebrick", wrap=True, bbox={"facecolor": "white", "edgecolor": "firebrick", "alpha": 0.9})
    ax.legend(fontsize=8, title="dotted: max distance", title_fontsize=7)
    _save(fig, path)
    return data


# ----------------------------------------------------------------------------------------- simulate


def simulate_data(result: dict[str, Any]) -> dict[str, Any]:
    """What ``simulate --plot`` draws, from ``simulate --json``'s ``result``.

    Per intensity class and sifted basis: measured and expected gain (Lim et al., PRA 89, 022307
    (2014) device model, :mod:`qkdstack.theory.device`), their ratio (None below
    :data:`MIN_DETECTIONS_FOR_RATIO` detections) and the QBER both ways. Without
    an eavesdropper every ratio is 1 within the statistics; a photon-number-splitting attack keeps the
    signal's gain and starves the decoys (ratios well below 1), which is what decoy states detect
    (Lo, Ma, Chen, PRL 94, 230504 (2005)).
    """
    rows = []
    for r in result["classes"]:
        ratio = None
        if r["gain"] is not None and r["gain_theory"] > 0 and r["detections"] >= MIN_DETECTIONS_FOR_RATIO:
            ratio = r["gain"] / r["gain_theory"]
        rows.append({
            "class": r["class"], "intensity": r["intensity"], "basis": r["basis"],
            "detections": r["detections"], "gain": r["gain"], "gain_theory": r["gain_theory"],
            "gain_ratio": ratio, "qber": r["qber"], "qber_theory": r["qber_theory"],
        })
    title = (f"simulate: {result['distance_km']:g} km, eve {result['eve']}, {result['pulses']:.3g} pulses "
             f"({result['form']} form)")
    return {"title": title, "eve": result["eve"], "classes": rows}


def simulate_figure(path: str, data: dict[str, Any]) -> dict[str, Any]:
    """Draw :func:`simulate_data`'s ``data``: gain, measured/expected gain and QBER per intensity; return ``data``."""
    fig, axes = _figure(11, 3.8, 1, 3)
    ax_gain, ax_ratio, ax_qber = axes[0]
    classes = sorted({r["class"] for r in data["classes"]})
    labels = [f"μ = {next(r['intensity'] for r in data['classes'] if r['class'] == k):.3g}" for k in classes]
    for shift, basis, colour in ((-0.12, "Z", "tab:blue"), (0.12, "X", "tab:orange")):
        rows = [r for r in data["classes"] if r["basis"] == basis]
        xs = [classes.index(r["class"]) + shift for r in rows]
        gain = [(x, r["gain"]) for x, r in zip(xs, rows, strict=True) if r["gain"]]
        ax_gain.scatter([g[0] for g in gain], [g[1] for g in gain], color=colour, label=f"{basis} measured")
        ax_gain.scatter(xs, [r["gain_theory"] for r in rows], facecolors="none", edgecolors=colour, s=90,
                        label=f"{basis} expected")
        ratio = [(x, r["gain_ratio"]) for x, r in zip(xs, rows, strict=True) if r["gain_ratio"] is not None]
        ax_ratio.bar([g[0] for g in ratio], [g[1] for g in ratio], width=0.22, color=colour, label=basis)
        qber = [(x, 100 * r["qber"]) for x, r in zip(xs, rows, strict=True) if r["qber"] is not None]
        ax_qber.scatter([q[0] for q in qber], [q[1] for q in qber], color=colour, label=f"{basis} measured")
        ax_qber.scatter(xs, [100 * r["qber_theory"] for r in rows], facecolors="none", edgecolors=colour, s=90,
                        label=f"{basis} expected")
    ax_gain.set_yscale("log")
    ax_gain.set_ylabel("gain (detections per pulse)")
    ax_ratio.axhline(1.0, color="k", lw=0.8, ls="--")
    ax_ratio.set_ylabel("measured / expected gain")
    ax_qber.set_ylabel("QBER (%)")
    ratio_title = f"gain: measured / expected (≥ {MIN_DETECTIONS_FOR_RATIO} detections)"
    for ax, name in ((ax_gain, "gain"), (ax_ratio, ratio_title), (ax_qber, "QBER")):
        ax.set_xticks(range(len(classes)), labels)
        ax.set_title(name, fontsize=9)
        ax.grid(True, axis="y", alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(data["title"], fontsize=10)
    _save(fig, path)
    return data


# ------------------------------------------------------------------------------------------ distill


def distill_data(rounds: list[dict[str, Any]], summary: dict[str, Any], *, distance_km: float,
                 max_qber: float) -> dict[str, Any]:
    """What ``distill --plot`` draws, from ``distill --json``'s ``rounds`` and ``summary``.

    Per round: QBER in the key (Z) and test (X) bases, secret key bits, and whether (and why) it
    aborted; aborted rounds have no QBER here (the round stopped before or while estimating it).
    ``note``: the sentence written into the figure when no round gave key.
    """
    per_round = []
    for i, r in enumerate(rounds, start=1):
        aborted = bool(r["aborted"])
        per_round.append({
            "round": i,
            "aborted": aborted,
            "reason": r.get("reason") if aborted else None,
            "qber_z": None if aborted else r["qber_z"],
            "qber_x": None if aborted else r["qber_x"],
            "key_bits": 0 if aborted else int(r["key_bits"]),
        })
    title = (f"distill: {distance_km:g} km, {summary['accepted']}/{summary['rounds']} rounds accepted, "
             f"{summary['secret_bits']:,} secret bits")
    note = None
    if not any(not r["aborted"] for r in per_round):
        stages = Counter(r["stage"] for r in rounds)
        note = (f"no key: every round aborted ({', '.join(f'{k} ×{v}' for k, v in stages.items())}); "
                "the reasons are printed with the rounds")
    return {"title": title, "max_qber": max_qber, "rounds": per_round, "note": note}


def distill_figure(path: str, data: dict[str, Any]) -> dict[str, Any]:
    """Draw :func:`distill_data`'s ``data``: QBER and key bits per round; return ``data``."""
    fig, axes = _figure(7.5, 5.5, 2, 1, sharex=True)
    ax_q, ax_k = axes[0][0], axes[1][0]
    rounds = data["rounds"]
    ok = [r for r in rounds if not r["aborted"]]
    bad = [r for r in rounds if r["aborted"]]
    ax_q.plot([r["round"] for r in ok], [100 * r["qber_z"] for r in ok], "o-", ms=4, label="QBER Z (key)")
    ax_q.plot([r["round"] for r in ok], [100 * r["qber_x"] for r in ok], "s-", ms=4, label="QBER X (test)")
    ax_q.axhline(100 * data["max_qber"], color="firebrick", lw=0.8, ls="--", label="--max-qber")
    ax_q.set_ylabel("QBER (%)")
    ax_q.set_ylim(bottom=0)
    ax_k.bar([r["round"] for r in rounds], [r["key_bits"] for r in rounds], color="tab:green", label="secret key")
    if bad:
        ax_k.scatter([r["round"] for r in bad], [0] * len(bad), marker="x", color="firebrick", s=60, zorder=3,
                     label="aborted")
        ax_q.scatter([r["round"] for r in bad], [0] * len(bad), marker="x", color="firebrick", s=60,
                     label="aborted", clip_on=False)
    ax_k.set_ylabel("secret key (bits)")
    ax_k.set_ylim(bottom=0, top=max([1, *(1.1 * r["key_bits"] for r in rounds)]))
    if data["note"]:
        ax_k.text(0.5, 0.5, data["note"], transform=ax_k.transAxes, ha="center", va="center", fontsize=9,
                  color="firebrick", wrap=True, bbox={"facecolor": "white", "edgecolor": "firebrick", "alpha": 0.9})
    ax_k.set_xlabel("round")
    for ax in (ax_q, ax_k):
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
        if len(rounds) <= 20:
            ax.set_xticks([r["round"] for r in rounds])
    ax_q.set_title(data["title"], fontsize=10)
    _save(fig, path)
    return data
