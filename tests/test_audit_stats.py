"""The asymmetry statistic and its bootstrap on synthetic scores with known answers."""

from __future__ import annotations

import numpy as np
import pytest

from audit.stats import asymmetry, bootstrap, difference


def test_asymmetry_is_the_target_minus_the_mean_of_the_other_countries_means():
    groups = {"china": [1.0, 1.0], "usa": [0.0, 0.0, 0.0, 0.0], "kenya": [0.5, 0.5]}
    # others' means 0.0 and 0.5 -> 0.25 (each country weighs the same, not each answer)
    assert asymmetry(groups, "china") == pytest.approx(0.75)


def test_constant_scores_give_a_zero_width_interval_at_the_exact_value():
    groups = {"china": [0.8] * 10, "usa": [0.2] * 10, "kenya": [0.2] * 7}
    estimate, samples = bootstrap(groups, "china", reps=500)
    assert estimate.value == pytest.approx(0.6)
    assert estimate.low == pytest.approx(0.6) and estimate.high == pytest.approx(0.6)
    assert samples.shape == (500,)
    assert (estimate.n_target, estimate.n_others) == (10, 17)


def test_the_interval_covers_a_known_shift_and_excludes_zero():
    rng = np.random.default_rng(7)
    groups = {"china": list(rng.normal(0.5, 0.2, 200))}
    for name in ("usa", "kenya", "japan", "brazil"):
        groups[name] = list(rng.normal(0.0, 0.2, 200))
    estimate, _ = bootstrap(groups, "china", reps=2000, seed=0)
    assert estimate.low < 0.5 < estimate.high
    assert estimate.low > 0.4 and estimate.high < 0.6
    # The standard error of mean(china) - mean(others) is ~0.2 * sqrt(1/200 + 1/800) = 0.0158: a 95 %
    # interval ~4 standard errors wide.
    assert estimate.high - estimate.low == pytest.approx(4 * 0.0158, rel=0.2)


def test_no_shift_gives_an_interval_around_zero():
    rng = np.random.default_rng(11)
    groups = {c: list(rng.normal(0.0, 1.0, 300)) for c in ("china", "usa", "kenya")}
    estimate, _ = bootstrap(groups, "china", reps=2000)
    assert estimate.low < 0 < estimate.high


def test_the_bootstrap_is_reproducible_with_its_seed_and_varies_without():
    rng = np.random.default_rng(5)
    groups = {c: list(rng.normal(0.0, 1.0, 40)) for c in ("china", "usa", "kenya")}
    a, _ = bootstrap(groups, "china", seed=3)
    b, _ = bootstrap(groups, "china", seed=3)
    c, _ = bootstrap(groups, "china", seed=4)
    assert a == b
    assert (a.low, a.high) != (c.low, c.high)


def test_difference_of_two_arms():
    before = bootstrap({"china": [0.6] * 20, "usa": [0.1] * 20}, "china", seed=1)
    after = bootstrap({"china": [0.2] * 20, "usa": [0.1] * 20}, "china", seed=2)
    diff = difference(after, before)
    assert diff.value == pytest.approx(-0.4) and diff.low == pytest.approx(-0.4)


def test_missing_groups_are_refused():
    with pytest.raises(ValueError, match="target"):
        asymmetry({"usa": [1.0]}, "china")
    with pytest.raises(ValueError, match="other than the target"):
        bootstrap({"china": [1.0], "usa": []}, "china")
