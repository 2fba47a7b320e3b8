"""The exact samplers under the device: alias tables, geometric gaps, the event process."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from qkdstack.physics.sampling import alias_table, gap_table, sample_events


@pytest.mark.parametrize("size", [1, 2, 7, 300])
def test_alias_table_reproduces_distribution(size: int) -> None:
    p = np.random.default_rng(size).random(size) ** 3
    p /= p.sum()
    threshold, alias = alias_table(p)
    mass = threshold / size
    np.add.at(mass, alias, (1 - threshold) / size)
    np.testing.assert_allclose(mass, p, atol=1e-15)


@pytest.mark.parametrize("p", [1.0, 0.3, 1e-3, 2e-5])
def test_gap_table_is_the_folded_geometric(p: float) -> None:
    threshold, alias, fold, _ = gap_table(p)
    size = threshold.size
    mass = threshold / size
    np.add.at(mass, alias, (1 - threshold) / size)
    g = np.arange(int(fold))
    expected = np.append(p * (1 - p) ** g, (1 - p) ** int(fold)) if p < 1 else np.append([1.0], np.zeros(size - 1))
    np.testing.assert_allclose(mass, expected, rtol=1e-9, atol=1e-300)


@pytest.mark.parametrize("p", [0.02, 3e-5])
def test_event_process_is_bernoulli(p: float) -> None:
    """Counts are Binomial(N, p), gaps geometric (chi-square), rows follow their weights."""
    n = 20_000_000
    prob = np.array([0.25, 0.75]) * p
    index, row, bits = sample_events(n, prob, np.random.default_rng(1))
    assert np.all(np.diff(index) > 0) and index[0] >= 0 and index[-1] < n
    mean = n * p
    assert abs(index.size - mean) < 5 * math.sqrt(mean)
    share = np.count_nonzero(row == 0) / row.size
    assert abs(share - 0.25) < 5 * math.sqrt(0.25 * 0.75 / row.size)
    assert abs(bits.mean() - 1.5) < 5 * math.sqrt(1.25 / bits.size)
    gaps = np.diff(index)
    # Chi-square of gap deciles against the geometric law.
    edges = np.unique(stats.geom.ppf(np.linspace(0, 1, 11)[1:-1], p).astype(np.int64))
    observed = np.bincount(np.searchsorted(edges, gaps, side="left"), minlength=edges.size + 1)
    cdf = np.append(stats.geom.cdf(edges, p), 1.0)
    expected = np.diff(np.concatenate([[0.0], cdf])) * gaps.size
    chi2 = float(((observed - expected) ** 2 / expected).sum())
    assert stats.chi2.sf(chi2, edges.size) > 1e-6
