"""metrics.py: SQNR and error statistics (chunked, float64), and the one NaN/Inf check."""

from __future__ import annotations

import math

import pytest
import torch

from monoquant_core.metrics import all_finite, count_nonfinite, error_stats, sqnr_db


def test_sqnr_db_values():
    x = torch.ones(100)
    assert sqnr_db(x, x) == math.inf
    assert sqnr_db(x, x * 0.9) == pytest.approx(20.0, abs=1e-5)


def test_error_stats_max_and_relative_error():
    ref = torch.tensor([3.0, 4.0])
    db, peak, rel = error_stats(ref, torch.tensor([3.0, 3.5]))
    assert peak == pytest.approx(0.5)
    assert rel == pytest.approx(0.5 / 5.0)
    assert db == pytest.approx(10 * math.log10(25 / 0.25))


def test_all_zero_reference_is_inf_when_exact_and_minus_inf_otherwise():
    z = torch.zeros(10)
    assert error_stats(z, z)[0] == math.inf
    assert error_stats(z, z + 1e-3)[0] == -math.inf


def test_chunks_give_the_same_numbers_as_one_pass():
    g = torch.Generator().manual_seed(0)
    ref = torch.randn(1000, generator=g)
    approx = ref + torch.randn(1000, generator=g) * 0.01
    whole = error_stats(ref, approx)
    chunked = error_stats(ref, approx, chunk=7)
    assert chunked == pytest.approx(whole, rel=1e-6)  # float32 sums: a few ulps apart
    exact = error_stats(ref.double(), approx.double(), chunk=7)  # float64 in, float64 sums
    assert exact == pytest.approx(error_stats(ref.double(), approx.double()), rel=1e-12)
    assert whole == pytest.approx(exact, rel=1e-6)


def test_squares_that_overflow_float32_are_summed_in_float64():
    ref = torch.tensor([3e38, -2e38, 1.0])
    db, peak, rel = error_stats(ref, ref * (1 - 2**-10))
    assert rel == pytest.approx(2**-10, rel=1e-3)
    assert db == pytest.approx(20 * math.log10(2**10), abs=1e-3) and math.isfinite(peak)


def test_all_finite_and_count_nonfinite():
    t = torch.randn(5, 5)
    assert all_finite(t) and count_nonfinite(t) == 0
    t[1, 2], t[3, 3], t[4, 0] = float("nan"), float("inf"), float("-inf")
    assert not all_finite(t) and count_nonfinite(t) == 3
    assert all_finite(torch.empty(0)) and all_finite(torch.tensor([1, 2]))
    assert count_nonfinite(torch.tensor([1, 2])) == 0


def test_non_finite_approximation_gives_a_number_not_a_math_error():
    ref = torch.tensor([1.0, 2.0])
    assert error_stats(ref, torch.tensor([1.0, math.inf]))[0] == -math.inf
    assert math.isnan(error_stats(ref, torch.tensor([1.0, math.nan]))[0])
    assert math.isnan(error_stats(torch.tensor([math.inf, 1.0]), torch.tensor([0.0, 1.0]))[0])
