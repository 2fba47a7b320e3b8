"""``qkdstack keyrate``: expected secret-key rate of a decoy-state BB84 link versus distance.

Maps the flags onto :mod:`qkdstack.theory` (see docs/theory.md):

* ``--decoy-method infinite``: Ma, Qi, Zhao, Lo, PRA 72, 012326 (2005), Eq. (1) with infinite
  decoys; ``vacuum-weak``: the same with the vacuum + weak decoy bounds, Eqs. (34) and (37),
  ν = the first decoy (a vacuum decoy 0 must be listed too). Both asymptotic; the rate per pulse
  includes the sifting factor q (1/2 with ``--basis-prob-z 0.5``, p_Z² otherwise).
* ``--decoy-method lim2014``: Lim, Curty, Walenta, Xu, Zbinden, PRA 89, 022307 (2014),
  Eqs. (1)–(5): finite key for a block of ``--block-size`` key-basis detections (n_X), with
  ``--eps-sec`` and ``--eps-cor``; without ``--block-size`` its asymptotic limit.
  Default method: lim2014 when ``--block-size`` is given, infinite otherwise.
* ``--optimize``: μ (asymptotic methods) or μ1, μ2, their probabilities and p_Z (lim2014).

It prints the rate per pulse and per second at each distance, the PLOB bound of the fibre, and
``max_distance_km``: the largest length with a positive rate, found by bisection (not only on
the grid). ``--plot FILE.png`` draws the rates on a log scale with the PLOB bound on a fine grid
of lengths (:mod:`qkdstack.plots`).

Several curves in one run: ``--block-size 1e6,1e8`` and ``--decoy-method infinite,lim2014`` take
comma-separated lists; the block sizes apply to the lim2014 curves (one curve per block size), the
asymptotic methods give one curve each. The table (or, with ``--json``, ``{"curves": [...]}``) and
the figure then show every curve.
"""

from __future__ import annotations

import argparse
import json
import math
from typing import Any

from qkdstack.commands.device_args import _float, add_device_arguments, device_params_from_args
from qkdstack.commands.validate import plot_file, protocol_value
from qkdstack.errors import ConfigError
from qkdstack.theory.keyrate import METHODS, ExpectedRate, expected_key_rate, max_distance_km
from qkdstack.theory.plob import plob_bound

PLOB_GRID_POINTS = 400
"""Lengths at which the figure draws the PLOB bound (between the first and the last distance)."""


def _block_sizes(text: str) -> list[float]:
    """``--block-size N_X[,N_X...]``: one or several block sizes, each ≥ 1 (argparse ``type=``)."""
    values = []
    for part in text.split(","):
        try:
            value = _float(part.strip())
        except (argparse.ArgumentTypeError, ValueError):
            raise argparse.ArgumentTypeError(f"must be a number of key-basis detections (or several, "
                                             f"comma-separated), got {text!r}") from None
        if not value >= 1:
            raise argparse.ArgumentTypeError(f"must be ≥ 1 key-basis detection, got {part.strip()}")
        values.append(value)
    return values


def _methods(text: str) -> list[str]:
    """``--decoy-method M[,M...]``: one or several of :data:`METHODS` (argparse ``type=``)."""
    names = [m.strip() for m in text.split(",")]
    if not all(m in METHODS for m in names):
        raise argparse.ArgumentTypeError(f"must be one of {', '.join(METHODS)} (or several, comma-separated), "
                                         f"got {text!r}")
    return names


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = subparsers.add_parser(
        "keyrate",
        help="expected secret-key rate versus distance (Ma 2005, Lim 2014, PLOB)",
        description="Expected secret-key rate of decoy-state BB84 versus fibre length: asymptotic "
        "(Ma et al. 2005: infinite or vacuum+weak decoys) or finite-key (Lim et al. 2014), with the "
        "PLOB repeaterless bound.",
    )
    add_device_arguments(p)
    g = p.add_argument_group("key rate")
    g.add_argument(
        "--ec-efficiency",
        type=_float,
        default=1.16,
        metavar="F",
        help="error-correction efficiency f ≥ 1 (default 1.16)",
    )
    g.add_argument(
        "--block-size",
        type=_block_sizes,
        default=None,
        metavar="N_X",
        help="key-basis detections per block (Lim 2014's n_X); several, comma-separated (1e6,1e8), give one "
        "curve each; omit for the asymptotic rate",
    )
    g.add_argument("--eps-sec", type=protocol_value("--eps-sec", "eps_sec"), default=1e-10,
                   help="secrecy parameter ε_sec (default 1e-10)")
    g.add_argument("--eps-cor", type=protocol_value("--eps-cor", "eps_cor"), default=1e-15,
                   help="correctness parameter ε_cor (default 1e-15)")
    g.add_argument(
        "--decoy-method",
        type=_methods,
        default=None,
        metavar="METHOD",
        help="infinite | vacuum-weak | lim2014, or several comma-separated (one curve each; default: lim2014 "
        "with --block-size, else infinite)",
    )
    g.add_argument(
        "--optimize",
        action="store_true",
        help="optimise intensities (and, for lim2014, their probabilities and p_Z) at each distance",
    )
    g.add_argument("--json", action="store_true", help="print JSON instead of a table")
    g.add_argument("--plot", type=plot_file, default=None, metavar="FILE.png",
                   help="save a log-scale plot of rate vs distance with the PLOB bound (format from the extension: "
                   "png, pdf, svg, ...; needs matplotlib: pip install 'qkdstack[plot]')")
    p.set_defaults(func=run)


def _one(flag: str, value: Any) -> Any:
    """A flag's single value: lists of one are unwrapped; several are refused (one curve at a time here)."""
    if isinstance(value, list | tuple):
        if len(value) != 1:
            raise ConfigError(f"{flag} takes one value here, got {len(value)}")
        return value[0]
    return value


def curves(args: argparse.Namespace) -> list[argparse.Namespace]:
    """One namespace per curve, each with a single ``decoy_method`` and ``block_size``.

    The block sizes of ``--block-size`` go to the lim2014 curves; ``infinite`` and ``vacuum-weak``
    are asymptotic and give one curve each. Without ``--decoy-method``: lim2014 if a block size is
    given, else infinite (as for a single curve).
    """
    blocks = args.block_size if isinstance(args.block_size, list | tuple) else [args.block_size]
    blocks = [b for b in blocks if b is not None]
    methods = args.decoy_method if isinstance(args.decoy_method, list | tuple) else [args.decoy_method]
    methods = [m for m in methods if m is not None] or ["lim2014" if blocks else "infinite"]
    if blocks and "lim2014" not in methods:
        raise ConfigError(f"--block-size (finite key) needs --decoy-method lim2014, not {','.join(methods)}")
    out: list[argparse.Namespace] = []
    seen = set()
    for method in methods:
        for block in (blocks or [None]) if method == "lim2014" else [None]:
            if (method, block) in seen:
                continue
            seen.add((method, block))
            out.append(argparse.Namespace(**{**vars(args), "decoy_method": method, "block_size": block}))
    return out


def _settings(args: argparse.Namespace) -> dict[str, Any]:
    block_size = _one("--block-size", args.block_size)
    method = _one("--decoy-method", args.decoy_method) or ("lim2014" if block_size is not None else "infinite")
    if block_size is not None and method != "lim2014":
        raise ConfigError(f"--block-size (finite key) needs --decoy-method lim2014, not {method}")
    if block_size is not None and not block_size >= 1:
        raise ConfigError(f"--block-size must be ≥ 1 key-basis detection, got {block_size}")
    if not args.ec_efficiency >= 1:
        raise ConfigError(f"--ec-efficiency must be ≥ 1 (the Shannon limit), got {args.ec_efficiency}")
    for flag, value in (("--eps-sec", args.eps_sec), ("--eps-cor", args.eps_cor)):
        if not 0 < value < 1:
            raise ConfigError(f"{flag} must lie in (0, 1), got {value}")
    return {
        "method": method,
        "f_ec": args.ec_efficiency,
        "block_size": block_size,
        "eps_sec": args.eps_sec,
        "eps_cor": args.eps_cor,
        "optimize": args.optimize,
    }


def _rate(args: argparse.Namespace, settings: dict[str, Any], distance_km: float) -> ExpectedRate:
    params = device_params_from_args(args, distance_km=distance_km)
    return expected_key_rate(params, **settings)


def rate_rows(args: argparse.Namespace, settings: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per ``--distance-km``: :meth:`ExpectedRate.to_dict` with ``loss_db`` and ``plob_per_pulse``.

    Every distance is validated before any rate is optimised. The Python API (:mod:`qkdstack.api`)
    calls this too.
    """
    distances = tuple(args.distance_km)
    for d in distances:
        device_params_from_args(args, distance_km=d)
    rows = []
    for d in distances:
        r = _rate(args, settings, d)
        row = r.to_dict()
        row["distance_km"] = d
        row["loss_db"] = r.params.channel.loss_db
        row["plob_per_pulse"] = float(plob_bound(r.params.channel.transmittance))
        rows.append(row)
    return rows


def compute(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Per curve (:func:`curves`): method, block size, settings, ``max_distance_km`` and the rows per distance."""
    per_curve = curves(args)
    all_settings = [_settings(c) for c in per_curve]  # every curve checked before any rate is computed
    results = []
    for c, settings in zip(per_curve, all_settings, strict=True):
        rows = rate_rows(c, settings)
        max_km = max_distance_km(lambda d, c=c, settings=settings: _rate(c, settings, d).rate_per_pulse)
        results.append({"method": settings["method"], "block_size": settings["block_size"], "settings": settings,
                        "max_distance_km": max_km, "points": rows})
    return results


def run(args: argparse.Namespace) -> int:
    if args.plot:
        from qkdstack.plots import require_matplotlib

        require_matplotlib()  # before any computation: a missing matplotlib is one sentence and exit 2
    results = compute(args)
    if args.plot:
        plot(args, results)
    if args.json:
        outs = [_json_curve(r) for r in results]
        out = outs[0] if len(outs) == 1 else {"curves": outs}
        print(json.dumps(_finite_or_none(out), indent=2, allow_nan=False))
    else:
        for i, r in enumerate(results):
            if i:
                print()
            _print_table(r["points"], r["settings"], r["max_distance_km"])
    return 0


def _no_key(result: dict[str, Any]) -> bool:
    return not any(p["rate_per_pulse"] > 0 for p in result["points"])


def _json_curve(result: dict[str, Any]) -> dict[str, Any]:
    max_km = result["max_distance_km"]
    return {
        "method": result["method"],
        "settings": result["settings"],
        "max_distance_km": max_km if (max_km is None or math.isfinite(max_km)) else None,
        "max_distance_unbounded": max_km == math.inf,
        "no_key_at_any_distance": _no_key(result),
        "points": result["points"],
    }


def plob_grid(args: argparse.Namespace, distances: list[float], n: int = PLOB_GRID_POINTS
              ) -> tuple[list[float], list[float]]:
    """The PLOB bound on ``n`` lengths from the shortest to the longest distance (0 to 2× for a single one)."""
    lo, hi = min(distances), max(distances)
    if hi <= lo:
        lo, hi = 0.0, max(2 * hi, 10.0)
    grid = [lo + (hi - lo) * i / (n - 1) for i in range(n)]
    eta = [device_params_from_args(args, distance_km=x).channel.transmittance for x in grid]
    return grid, [float(b) for b in plob_bound(eta)]


def plot_data(args: argparse.Namespace, results: list[dict[str, Any]]) -> dict[str, Any]:
    """What ``--plot`` draws (:func:`qkdstack.plots.keyrate_data`) for :func:`run`'s per-curve ``results``."""
    from qkdstack.plots import keyrate_data

    grid, bound = plob_grid(args, [p["distance_km"] for r in results for p in r["points"]])
    return keyrate_data(results, grid, bound, bool(args.optimize))


def plot(args: argparse.Namespace, results: list[dict[str, Any]]) -> dict[str, Any]:
    """Draw ``results`` into ``args.plot``; return the numbers drawn."""
    from qkdstack.plots import keyrate_figure

    return keyrate_figure(args.plot, plot_data(args, results))


def _finite_or_none(obj: Any) -> Any:
    """JSON has no inf/NaN: write them as null (e.g. the PLOB bound of a lossless fibre)."""
    if isinstance(obj, dict):
        return {k: _finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_finite_or_none(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def _print_table(rows: list[dict[str, Any]], settings: dict[str, Any], max_km: float | None) -> None:
    block = settings["block_size"]
    title = f"method {settings['method']}" + (f", block n_X = {block:.3g}" if block else ", asymptotic")
    print(title + (", optimised" if settings["optimize"] else ""))
    print(
        f"{'distance_km':>11} {'loss_dB':>8} {'QBER_%':>7} {'rate_bit/pulse':>15} {'rate_bit/s':>12} "
        f"{'PLOB_bit/pulse':>15}  intensities"
    )
    for r in rows:
        mus = ",".join(f"{m:.3g}" for m in r["intensities"])
        print(
            f"{r['distance_km']:>11.2f} {r['loss_db']:>8.2f} {100 * r['qber']:>7.3f} {r['rate_per_pulse']:>15.4e} "
            f"{r['rate_bps']:>12.4e} {r['plob_per_pulse']:>15.4e}  {mus}"
        )
    if not any(r["rate_per_pulse"] > 0 for r in rows):
        print("note: no key at any distance listed" + ("" if max_km is None else " (see max_distance_km)"))
    if max_km is None:
        print("max_distance_km: none (no key even at 0 km)")
    elif math.isinf(max_km):
        print("max_distance_km: unbounded (key at every length tried)")
    else:
        print(f"max_distance_km: {max_km:.2f}")
