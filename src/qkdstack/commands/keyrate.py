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
the grid). ``--plot FILE.png`` draws the rates on a log scale with the PLOB bound.
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
        type=_float,
        default=None,
        metavar="N_X",
        help="key-basis detections per block (Lim 2014's n_X); omit for the asymptotic rate",
    )
    g.add_argument("--eps-sec", type=protocol_value("--eps-sec", "eps_sec"), default=1e-10,
                   help="secrecy parameter ε_sec (default 1e-10)")
    g.add_argument("--eps-cor", type=protocol_value("--eps-cor", "eps_cor"), default=1e-15,
                   help="correctness parameter ε_cor (default 1e-15)")
    g.add_argument(
        "--decoy-method",
        choices=METHODS,
        default=None,
        help="infinite | vacuum-weak | lim2014 (default: lim2014 with --block-size, else infinite)",
    )
    g.add_argument(
        "--optimize",
        action="store_true",
        help="optimise intensities (and, for lim2014, their probabilities and p_Z) at each distance",
    )
    g.add_argument("--json", action="store_true", help="print JSON instead of a table")
    g.add_argument("--plot", type=plot_file, default=None, metavar="FILE.png",
                   help="save a log-scale plot of rate vs distance (format from the extension: png, pdf, svg, ...)")
    p.set_defaults(func=run)


def _settings(args: argparse.Namespace) -> dict[str, Any]:
    method = args.decoy_method or ("lim2014" if args.block_size is not None else "infinite")
    if args.block_size is not None and method != "lim2014":
        raise ConfigError(f"--block-size (finite key) needs --decoy-method lim2014, not {method}")
    if args.block_size is not None and not args.block_size >= 1:
        raise ConfigError(f"--block-size must be ≥ 1 key-basis detection, got {args.block_size}")
    if not args.ec_efficiency >= 1:
        raise ConfigError(f"--ec-efficiency must be ≥ 1 (the Shannon limit), got {args.ec_efficiency}")
    for flag, value in (("--eps-sec", args.eps_sec), ("--eps-cor", args.eps_cor)):
        if not 0 < value < 1:
            raise ConfigError(f"{flag} must lie in (0, 1), got {value}")
    return {
        "method": method,
        "f_ec": args.ec_efficiency,
        "block_size": args.block_size,
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


def run(args: argparse.Namespace) -> int:
    settings = _settings(args)
    rows = rate_rows(args, settings)
    max_km = max_distance_km(lambda d: _rate(args, settings, d).rate_per_pulse)
    if args.plot:
        _plot(args.plot, rows, settings["method"], max_km)
    if args.json:
        out = {
            "method": settings["method"],
            "settings": settings,
            "max_distance_km": max_km if (max_km is None or math.isfinite(max_km)) else None,
            "max_distance_unbounded": max_km == math.inf,
            "points": rows,
        }
        print(json.dumps(_finite_or_none(out), indent=2, allow_nan=False))
    else:
        _print_table(rows, settings, max_km)
    return 0


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
    if max_km is None:
        print("max_distance_km: none (no key even at 0 km)")
    elif math.isinf(max_km):
        print("max_distance_km: unbounded (key at every length tried)")
    else:
        print(f"max_distance_km: {max_km:.2f}")


def _plot(path: str, rows: list[dict[str, Any]], method: str, max_km: float | None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = [r["distance_km"] for r in rows]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    pos = [(x, r["rate_per_pulse"]) for x, r in zip(xs, rows, strict=True) if r["rate_per_pulse"] > 0]
    if pos:
        ax.semilogy([p[0] for p in pos], [p[1] for p in pos], "o-", label=f"{method} key rate")
    ax.semilogy(xs, [r["plob_per_pulse"] for r in rows], "k--", label="PLOB bound −log2(1−η)")
    if max_km is not None and math.isfinite(max_km):
        ax.axvline(max_km, color="grey", lw=0.8, ls=":", label=f"max distance {max_km:.1f} km")
    ax.set_xlabel("fibre length (km)")
    ax.set_ylabel("secret key rate (bit/pulse)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    try:
        fig.savefig(path, dpi=120)
    except OSError as exc:
        raise ConfigError(f"--plot: cannot write {path}: {exc.strerror or exc}") from None
    finally:
        plt.close(fig)
