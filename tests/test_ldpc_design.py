"""scripts/ldpc_design.py, the density evolution behind the redesigned LDPC distributions: it reproduces a
published threshold and models the codes as ldpc_codes builds and the protocol merges them."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from qkdstack.protocol import ldpc, ldpc_codes

_SPEC = importlib.util.spec_from_file_location(
    "ldpc_design", Path(__file__).resolve().parents[1] / "scripts" / "ldpc_design.py")
design = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(design)


def test_regular_3_6_threshold_on_the_bsc():
    """The (3,6)-regular ensemble's BSC threshold under sum-product is p* ≈ 0.084 (Richardson & Urbanke,
    IEEE Trans. IT 47(2), 2001, Table I): it decodes a little below and not a little above."""
    var, chk = {3: 1.0}, {6: 1.0}
    assert design.decodes(var, chk, 0.078, population=20000)
    assert not design.decodes(var, chk, 0.090, population=20000)


def test_model_caps_degree_two_and_merges_checks():
    node = design.capped(ldpc_codes.MEASURED_DISTRIBUTIONS[0.9], 0.9)
    assert node[2] == pytest.approx(0.1 * 0.999) and sum(node.values()) == pytest.approx(1.0)
    plain = design.checks(node, 0.9, 0.0)
    merged = design.checks(node, 0.9, 0.2)
    assert sum(plain.values()) == pytest.approx(1.0) and sum(merged.values()) == pytest.approx(1.0)
    avg = sum(d * w for d, w in plain.items())
    assert avg == pytest.approx(sum(d * f for d, f in node.items()) / 0.1)
    # 20 % of the rows merged in pairs: (1 − 0.4)/0.8 plain rows, 0.2/0.8 rows of twice the degree
    assert sum(w for d, w in merged.items() if d > 2 * min(plain) - 1) == pytest.approx(0.25)


def test_designed_high_rate_profile_beats_the_measured_one_where_the_protocol_works():
    """At 12 % merged rows the redesigned rate-0.9 ensemble decodes at a crossover where the measured
    profile, built as ldpc_codes builds it, does not (their f* 1.101 and 1.205, docs/ldpc.md)."""
    p = 0.0092
    new = design.capped(ldpc_codes.DESIGNED_DISTRIBUTIONS[0.9], 0.9)
    old = design.capped(ldpc_codes.MEASURED_DISTRIBUTIONS[0.9], 0.9)
    assert design.decodes(new, design.checks(new, 0.9, 0.12), p, population=20000)
    assert not design.decodes(old, design.checks(old, 0.9, 0.12), p, population=20000)


def test_shortened_variables_are_known_to_the_decoder():
    """A shortened variable is a fixed zero both parties know: with 30 % of them the (3,6) ensemble decodes
    above its threshold, and f counts only the key bits (rows / ((1 − s)·n·h(p)))."""
    var, chk = {3: 1.0}, {6: 1.0}
    assert not design.decodes(var, chk, 0.095, population=20000)
    assert design.decodes(var, chk, 0.095, population=20000, shortened=0.3)
    assert design.efficiency(0.02, 0.85, 0.1, 0.128) == pytest.approx(
        0.15 * 0.9 / (0.872 * ldpc.binary_entropy(0.02)))


def test_discretised_density_evolution_places_the_3_6_threshold_to_three_digits():
    """The deterministic evaluation the climbs use since 2026-12-04: p* = 0.084 for (3,6) on the BSC (Richardson &
    Urbanke 2001, Table I) between 0.083 and 0.085, where population dynamics needs a margin of ±0.006; and the
    shortened variables are known to it as to :func:`decodes`."""
    var, chk = {3: 1.0}, {6: 1.0}
    assert design.decodes_discrete(var, chk, 0.083)
    assert not design.decodes_discrete(var, chk, 0.085)
    assert design.decodes_discrete(var, chk, 0.095, shortened=0.3)
