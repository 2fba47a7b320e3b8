#!/usr/bin/env python3
"""Design LDPC variable-degree distributions for syndrome reconciliation over the BSC (outside CI).

Where the rate-0.8, 0.85 and 0.9 distributions of ``qkdstack.protocol.ldpc_codes.DESIGNED_DISTRIBUTIONS``
come from, reproducibly. Two parts:

* ``threshold``: the density-evolution threshold p* of an ensemble (Richardson & Urbanke, IEEE Trans.
  IT 47(2), 2001) under sum-product decoding on a BSC(p), estimated by *population dynamics*: each
  message density is a population of ``N`` samples; a check-to-variable message is
  2·atanh(Π tanh(m/2)) over d − 1 samples, a variable-to-check message the channel LLR plus d − 1 check
  messages, with d drawn from the edge-perspective degree distributions. The ensemble "decodes" at p when
  the fraction of negative messages falls below 10⁻⁵ (all-zero word). f* = (rows/n) / h(p*) is then the
  best efficiency an infinitely long code of that ensemble reaches.

  It models what the protocol really decodes: at most m − 1 degree-2 variables (``ldpc_codes.build_code``
  turns the excess into degree 3), concentrated check degrees, and optionally a fraction x of the rows
  merged in pairs (``ldpc_codes.merge_pairs``: a merged row is a check of twice the degree), the rate
  adaptation the protocol uses; merging 10 % of the rate-0.9 code's rows moves f* from 1.13 to 1.18;
  and optionally a fraction s of the variables shortened (``--shortened``: known zeros, as in a frame that
  does not fill its codeword; a 10⁵-bit frame in a 114688-bit codeword has s = 0.128).

* ``climb``: a hill climb on the edge-perspective variable distribution: move a random share of edges
  from one degree to another; keep the move when the new ensemble still decodes at p* + step (two
  independent populations). Greedy and local, so it finds a better distribution, not the best one.

Usage (about 10 min per climb on one core)::

    .venv/bin/python scripts/ldpc_design.py threshold 0.9
    .venv/bin/python scripts/ldpc_design.py climb 0.9 --merge 0.12 --steps 150 --seed 1

``threshold`` evaluates the distribution in ``DISTRIBUTIONS`` (or ``--dist JSON``, node perspective);
``climb`` prints every accepted step and the final distribution (node perspective) as JSON.
"""

from __future__ import annotations

import argparse
import json
import math

import numpy as np

from qkdstack.protocol.ldpc import binary_entropy

DEGREES = (2, 3, 4, 5, 6, 7, 8, 9, 10, 12, 14, 16, 20, 25, 30, 40)
"""Variable degrees the climb may move edges to."""


def efficiency(p: float, rate: float, merged: float, shortened: float = 0.0) -> float:
    """f at crossover p of a code of ``rate`` with a fraction ``merged`` of its rows merged and a fraction
    ``shortened`` of its variables shortened: rows / (key bits · h(p))."""
    return (1 - rate) * (1 - merged) / ((1 - shortened) * binary_entropy(p))


def capped(node: dict[int, float], rate: float) -> dict[int, float]:
    """Node fractions as ``build_code`` realises them: at most (1 − rate) of the variables of degree 2."""
    out = {d: f for d, f in node.items() if f > 1e-9}
    total = sum(out.values())
    out = {d: f / total for d, f in out.items()}
    cap = (1 - rate) * 0.999
    if out.get(2, 0.0) > cap:
        out[3] = out.get(3, 0.0) + out[2] - cap
        out[2] = cap
    return out


def checks(node: dict[int, float], rate: float, merged: float) -> dict[int, float]:
    """Check-degree fractions (node perspective): concentrated degrees E/m, a fraction ``merged`` of the m
    rows merged in pairs (so (1 − 2x)m plain rows and xm rows of two rows' degree, out of (1 − x)m)."""
    avg = sum(d * f for d, f in node.items()) / (1 - rate)
    lo = math.floor(avg)
    plain = {lo: 1 - (avg - lo), lo + 1: avg - lo}
    rows = 1 - merged
    out: dict[int, float] = {}
    for d, w in plain.items():
        out[d] = out.get(d, 0.0) + (1 - 2 * merged) * w / rows
        for d2, w2 in plain.items():
            out[d + d2] = out.get(d + d2, 0.0) + merged * w * w2 / rows
    return {d: w for d, w in out.items() if w > 1e-12}


def _node(edge: dict[int, float], rate: float) -> dict[int, float]:
    """Capped node fractions of an edge-perspective distribution."""
    return capped({d: e / d for d, e in edge.items() if e > 1e-6}, rate)


def _edges(node: dict[int, float]) -> tuple[np.ndarray, np.ndarray]:
    degrees = np.array(sorted(node))
    weights = np.array([node[d] * d for d in degrees], dtype=np.float64)
    return degrees, weights / weights.sum()


def decodes(var_node, chk_node, p: float, population: int = 30000, iterations: int = 300, seed: int = 5,
            shortened: float = 0.0) -> bool:
    """Population-dynamics density evolution at BSC(p): True when the error fraction falls below 1e-5.

    ``shortened``: that fraction of the variables, drawn at random as the protocol's layout does, is known
    (a fixed zero): its messages are certain, which is what shortening does to the graph.
    """
    rng = np.random.default_rng(seed)
    dv, wv = _edges(var_node)
    dc, wc = _edges(chk_node)
    llr = math.log((1 - p) / p)

    def channel(size):
        out = np.where(rng.random(size) < p, -llr, llr)
        if shortened:
            out[rng.random(size) < shortened] = 1e4
        return out

    v2c = channel(population)
    best, stalled = 1.0, 0
    for _ in range(iterations):
        t = np.tanh(np.clip(v2c, -40, 40) / 2)
        c2v = np.empty(population)
        degrees = rng.choice(dc, population, p=wc)
        for d in np.unique(degrees):
            sel = np.nonzero(degrees == d)[0]
            prod = np.prod(t[rng.integers(0, population, (sel.size, d - 1))], axis=1)
            c2v[sel] = 2 * np.arctanh(np.clip(prod, -1 + 1e-15, 1 - 1e-15))
        v2c = channel(population)
        degrees = rng.choice(dv, population, p=wv)
        for d in np.unique(degrees):
            sel = np.nonzero(degrees == d)[0]
            v2c[sel] += c2v[rng.integers(0, population, (sel.size, d - 1))].sum(axis=1)
        err = float(np.mean(v2c < 0) + 0.5 * np.mean(v2c == 0))
        if err < 1e-5:
            return True
        if err < best * 0.999:
            best, stalled = err, 0
        else:
            stalled += 1
            if stalled > 30:
                return False
    return False


def threshold(node, rate, merged=0.0, lo=0.002, hi=None, tol=1e-4, population=30000,
              shortened=0.0) -> tuple[float, float]:
    """(p*, f*) of the ensemble by bisection on p."""
    node = capped(node, rate)
    chk = checks(node, rate, merged)
    hi = hi or (0.05 if rate >= 0.7 else 0.2)
    while hi - lo > tol:
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if decodes(node, chk, mid, population, shortened=shortened) else (lo, mid)
    return lo, efficiency(lo, rate, merged, shortened)


def climb(node, rate, merged, steps, step_p, max_share, seed, population, max_degree=DEGREES[-1],
          shortened=0.0) -> dict[int, float]:
    rng = np.random.default_rng(seed)
    node = capped(node, rate)
    degrees = [d for d in DEGREES if d <= max_degree]
    p, f = threshold(node, rate, merged, population=population, shortened=shortened)
    print(json.dumps({"start": {"p": round(p, 5), "f": round(f, 4)}}), flush=True)
    total = sum(d * v for d, v in node.items())
    edge = {d: d * v / total for d, v in node.items()}
    for step in range(steps):
        src = int(rng.choice([d for d, e in edge.items() if e > 0]))
        dst = int(rng.choice(degrees))
        if dst == src:
            continue
        share = min(edge[src], rng.uniform(0.005, max_share))
        cand = dict(edge)
        cand[src] -= share
        cand[dst] = cand.get(dst, 0.0) + share
        cand_node = _node(cand, rate)
        chk = checks(cand_node, rate, merged)
        if all(decodes(cand_node, chk, p + step_p, population, seed=s, shortened=shortened) for s in (5, 6)):
            edge, p = cand, p + step_p
            print(json.dumps({"step": step, "p": round(p, 5), "f": round(efficiency(p, rate, merged, shortened), 4),
                              "node": {d: round(v, 5) for d, v in sorted(cand_node.items())}}), flush=True)
    return {d: round(v, 5) for d, v in sorted(_node(edge, rate).items())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("action", choices=("threshold", "climb"))
    parser.add_argument("rate", type=float)
    parser.add_argument("--dist", help="node-perspective variable distribution as JSON (default: DISTRIBUTIONS)")
    parser.add_argument("--merge", type=float, default=0.0, help="fraction of rows merged in pairs")
    parser.add_argument("--shortened", type=float, default=0.0,
                        help="fraction of variables shortened (a 10^5-bit frame in a 114688-bit codeword: 0.128)")
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--step-p", type=float, default=1e-4)
    parser.add_argument("--max-share", type=float, default=0.08)
    parser.add_argument("--population", type=int, default=30000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--max-degree", type=int, default=DEGREES[-1],
                        help="the climb moves edges to no higher degree")
    args = parser.parse_args()
    if args.dist:
        node = {int(d): float(v) for d, v in json.loads(args.dist).items()}
    else:
        from qkdstack.protocol.ldpc_codes import DISTRIBUTIONS
        node = dict(DISTRIBUTIONS[args.rate])
    if args.action == "threshold":
        p, f = threshold(node, args.rate, args.merge, population=args.population, shortened=args.shortened)
        print(json.dumps({"rate": args.rate, "merged": args.merge, "shortened": args.shortened,
                          "p_star": round(p, 5), "f_star": round(f, 4)}))
    else:
        final = climb(node, args.rate, args.merge, args.steps, args.step_p, args.max_share, args.seed,
                      args.population, args.max_degree, args.shortened)
        print(json.dumps({"final": final}))


if __name__ == "__main__":
    main()
