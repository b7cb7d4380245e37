"""The results table (eval/report.py): the bootstrap interval against its exact distribution,
and the plot, or a note without matplotlib."""
import logging

import numpy as np
import pytest

from eval.report import bootstrap_ci, plot


def test_bootstrap_matches_the_exact_bootstrap_distribution():
    """For 0/1 scores the resampled mean is Binomial(n, p) / n exactly; the 2000-resample
    percentile bounds must lie within one step (1/n) of its exact 2.5% and 97.5% quantiles."""
    from math import comb

    values = [1] * 13 + [0] * 7  # n 20, p 0.65
    n, p = len(values), 0.65
    cdf = np.cumsum([comb(n, k) * p**k * (1 - p) ** (n - k) for k in range(n + 1)])
    exact_low, exact_high = np.searchsorted(cdf, 0.025) / n, np.searchsorted(cdf, 0.975) / n  # 0.45, 0.85
    mean, low, high = bootstrap_ci(values)
    assert mean == 0.65 and abs(low - exact_low) <= 1 / n and abs(high - exact_high) <= 1 / n
    assert bootstrap_ci(values) == (mean, low, high)  # seeded: reproducible
    spread = [1.5, 2.0, 3.25, 4.0, 4.5, 5.0, 6.0, 6.5, 7.0]
    assert bootstrap_ci(spread, seed=1) != bootstrap_ci(spread)  # the seed is what fixes the table
    assert bootstrap_ci([5.0]) == (5.0, 5.0, 5.0)
    with pytest.raises(ValueError, match="non-empty"):
        bootstrap_ci([])


def test_plot_or_a_note(tmp_path, caplog):
    cells = {"a": {"mini": {"mean": 5.0, "ci_low": 4.0, "ci_high": 6.0}}}
    with caplog.at_level(logging.INFO):
        path = plot(cells, ["a"], ["mini"], tmp_path / "results.png")
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert path is None and not (tmp_path / "results.png").exists()
        assert "matplotlib is not installed: skipped the plot" in caplog.text
    else:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
