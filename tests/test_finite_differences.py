"""Analytic gradients against float64 central differences (the `softxent check` cases)."""

import numpy as np
import pytest

from softxent.cli import check


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_every_check_case_passes_its_finite_difference_comparison(seed):
    results = check.run_checks(seed)
    failures = [r for r in results if not r.passed]
    assert not failures, check.format_table(failures)
    assert len(results) >= 19


def test_a_wrong_gradient_fails_the_comparison():
    numeric = np.array([1.0, 2.0])
    assert not check._compare("wrong", numeric + 1e-3, numeric).passed
    assert check._compare("right", numeric + 1e-9, numeric).passed
