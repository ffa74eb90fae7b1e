"""Watermark verdicts: keys in hex, exact binomial p-values and thresholds, pooled and multi-key tests."""
from __future__ import annotations

from fractions import Fraction
from math import comb

import pytest
import torch

from core.errors import UserError
from pipelines.watermark.keys import format_key, new_key, parse_key
from pipelines.watermark.stats import best_key, p_value, pooled, threshold, verdict


def exact_tail(k: int, n: int) -> Fraction:
    return Fraction(sum(comb(n, i) for i in range(k, n + 1)), 2**n)


@pytest.mark.parametrize("n", [8, 48, 100])
def test_p_values_equal_the_exact_binomial_tail(n):
    for k in range(n + 1):
        exact = float(exact_tail(k, n))
        assert p_value(k, n) == pytest.approx(exact, rel=1e-9, abs=1e-300), (k, n)


@pytest.mark.parametrize("n,fpr", [(48, 1e-6), (48, 1e-2), (48, 0.05), (32, 1e-3), (480, 1e-6), (8, 1e-3)])
def test_threshold_is_the_smallest_count_at_the_rate(n, fpr):
    k = threshold(n, fpr)
    if k <= n:
        assert exact_tail(k, n) <= Fraction(fpr)
    if k > 0:
        assert exact_tail(k - 1, n) > Fraction(fpr)


def test_the_spec_example_48_bits_at_1e_minus_6_needs_41():
    assert threshold(48, 1e-6) == 41
    assert verdict(41, 48, 1e-6).watermarked and not verdict(40, 48, 1e-6).watermarked


def test_eight_bits_can_never_reach_one_in_a_million():
    assert threshold(8, 1e-6) == 9
    assert not verdict(8, 8, 1e-6).watermarked


def test_pooled_test_is_the_binomial_over_all_bits():
    v = pooled([30, 31, 29, 32], 48, 1e-6)
    assert (v.matched, v.bits) == (122, 192)
    assert v.p_value == pytest.approx(float(exact_tail(122, 192)), rel=1e-9)


def test_best_key_uses_bonferroni():
    matches = [20, 44, 25]
    m = best_key(matches, 48, 1e-6)
    assert m.index == 1 and m.keys == 3
    assert m.verdict.threshold == threshold(48, 1e-6 / 3)
    assert m.adjusted_p == pytest.approx(3 * float(exact_tail(44, 48)), rel=1e-9)


@pytest.mark.parametrize("bad", ["", "xyz123456789", "12345", "0x" + "f" * 13, "g" * 12])
def test_bad_keys_are_refused_with_a_message(bad):
    with pytest.raises(UserError):
        parse_key(bad, 48)


def test_key_round_trip_and_bit_order():
    bits = parse_key("8000000000a1", 48)
    assert bits.shape == (48,) and bits[0] == 1 and bits[1:40].sum() == 0
    assert bits[-8:].tolist() == [1, 0, 1, 0, 0, 0, 0, 1]
    key = new_key(48)
    assert len(key) == 12 and format_key(parse_key(key)) == key
    assert format_key(parse_key(" 0xDEAD_BEEF_0001 ")) == "deadbeef0001"
    assert torch.equal(parse_key("ff", 8), torch.ones(8))
