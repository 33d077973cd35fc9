"""Holm's adjustment against worked examples, and the bootstrap test against hand counts."""

from __future__ import annotations

import pytest

from nnsteer.evaluation.paired import verdict
from nnsteer.stats import bootstrap_interval, bootstrap_p, holm


def test_holm_worked_examples():
    # Sorted: 0.005 x 4 = 0.02, 0.01 x 3 = 0.03, 0.03 x 2 = 0.06, 0.04 x 1 = 0.04 -> max(0.06, 0.04).
    assert holm([0.01, 0.04, 0.03, 0.005, None]) == pytest.approx([0.03, 0.06, 0.06, 0.02, None])
    # Five at 0.01..0.05: 0.05, 0.08, 0.09, then 0.08 and 0.05 are raised to the running 0.09.
    assert holm([0.05, 0.04, 0.03, 0.02, 0.01]) == pytest.approx([0.09, 0.09, 0.09, 0.08, 0.05])
    assert holm([0.5, 0.6]) == [1.0, 1.0]  # capped at 1, kept monotone
    assert holm([0.02]) == [0.02] and holm([None, None]) == [None, None] and holm([]) == []


def test_bootstrap_p_hand_counts_and_duality_with_the_interval():
    # Every resampled mean of a constant positive sample is > 0: p = 2 / (B + 1).
    assert bootstrap_p([0.2, 0.2, 0.2], n_boot=999) == pytest.approx(2 / 1000)
    # Of {-0.1, 0, -0.2}, a resample has mean >= 0 only if it is all 0: probability 1/27.
    assert bootstrap_p([-0.1, 0.0, -0.2], n_boot=20000) == pytest.approx(2 / 27, abs=0.01)
    assert bootstrap_p([0.0, 0.0]) == 1.0
    for values in ([0.1, -0.05, 0.2, 0.15, 0.0, 0.3, 0.05, 0.1], [0.02, -0.1, 0.05, -0.03, 0.04]):
        low, high = bootstrap_interval(values, n_boot=2000, seed=1)
        assert (low > 0 or high < 0) == (bootstrap_p(values, n_boot=2000, seed=1) < 0.05)


def test_verdict_needs_the_holm_adjusted_test():
    row = {"diff": 0.05, "diff_low": 0.01, "diff_high": 0.09, "p": 0.03, "p_holm": 0.09,
           "vector": "behaviour", "direction": "positive", "n_pairs": 10}
    text, achieved = verdict(row)
    assert not achieved and "no clear change after Holm's adjustment" in text
    assert "adjusted p = 0.09" in text and "unadjusted interval excludes 0" in text
    text, achieved = verdict({**row, "p_holm": 0.012})
    assert achieved and text == "raised (interval excludes 0; Holm-adjusted p = 0.012)"
    text, achieved = verdict({**row, "vector": "random", "p_holm": 0.012})
    assert not achieved and text.startswith("the random control raised it too")
