"""Format test computation: content-token alignment and Jensen-Shannon divergence by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from moescope.analysis import formattest as ft


def test_js_divergence_by_hand() -> None:
    assert ft.js_divergence([1.0, 0.0], [0.0, 1.0]) == pytest.approx(1.0)  # disjoint: 1 bit
    assert ft.js_divergence([0.2, 0.8], [0.2, 0.8]) == pytest.approx(0.0, abs=1e-12)
    # p = (1, 0), q = (1/2, 1/2), M = (3/4, 1/4):
    # KL(p||M) = log2(4/3), KL(q||M) = 1/2 log2(2/3) + 1/2 log2(2); JSD = mean of the two
    expected = 0.5 * (math.log2(4 / 3) + 0.5 * math.log2(2 / 3) + 0.5)
    assert ft.js_divergence([1.0, 0.0], [0.5, 0.5]) == pytest.approx(expected)
    assert expected == pytest.approx(0.311278, abs=1e-6)
    # row-wise
    np.testing.assert_allclose(ft.js_divergence(np.eye(2), np.eye(2)[::-1], axis=1), [1.0, 1.0])


def test_align_content_tokens_by_hand() -> None:
    # plain:  "What is 2+3?\n\nAnswer is 5"
    # marked: "Problem: What is 2+3?\nSolution: Answer is 5"
    plain = [(0, 4), (4, 7), (7, 9), (9, 10), (10, 11), (11, 12), (12, 14), (14, 20), (20, 23), (23, 25)]
    marked = [
        (0, 7), (7, 8), (8, 13), (13, 16), (16, 18), (18, 19), (19, 20), (20, 21), (21, 22),
        (22, 30), (30, 31), (31, 38), (38, 41), (41, 43),
    ]
    segments = [(0, 9, 12), (14, 32, 11)]  # the problem and the solution text
    i_plain, i_marked = ft.align_content_tokens(plain, marked, segments)
    # "What"/" What" and "Answer"/" Answer" are tokenized differently next to the markers: left out
    assert i_plain.tolist() == [1, 2, 3, 4, 5, 8, 9]
    assert i_marked.tolist() == [3, 4, 5, 6, 7, 12, 13]


def test_routing_shift() -> None:
    plain = np.array([[1.0, 0.0], [0.5, 0.5], [0.2, 0.8]])
    marked = np.array([[0.0, 1.0], [0.5, 0.5], [0.2, 0.8]])
    shift = ft.measure_routing_shift(plain, marked)
    np.testing.assert_allclose(shift.token_js_divergence, [1.0, 0.0, 0.0], atol=1e-12)
    assert shift.mean_token_js_divergence == pytest.approx(1 / 3)
    # token 1 is a tie (argmax 0 in both); only token 0 changed its first choice
    assert shift.top1_changed_fraction == pytest.approx(1 / 3)
    # means (17/30, 13/30) vs (7/30, 23/30)
    assert shift.js_divergence_of_means == pytest.approx(ft.js_divergence([17, 13], [7, 23]))
    assert set(shift.to_dict()) == {
        "n_tokens", "js_divergence_of_means", "mean_token_js_divergence", "top1_changed_fraction"
    }
    # the experts the layer chose take precedence over the argmax
    chosen = ft.measure_routing_shift(plain, plain, np.array([0, 1, 1]), np.array([0, 0, 1]))
    assert chosen.top1_changed_fraction == pytest.approx(1 / 3) and chosen.mean_token_js_divergence == 0
    with pytest.raises(ValueError):
        ft.measure_routing_shift(plain, marked[:2])


def test_random_pair_reference_scales() -> None:
    # group 0 always routes (1, 0), group 1 always (0, 1): same-group pairs 0 bits, cross-group 1 bit
    probs = np.array([[1.0, 0.0]] * 5 + [[0.0, 1.0]] * 4)
    group = np.array([0] * 5 + [1] * 4)
    assert ft.random_pair_js_divergence(probs, group, same_group=True) == pytest.approx(0.0, abs=1e-12)
    assert ft.random_pair_js_divergence(probs, group, same_group=False) == pytest.approx(1.0)
    # a token is never paired with itself: two tokens per group with opposite routing -> 1 bit
    probs2 = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0]])
    assert ft.random_pair_js_divergence(probs2, np.array([0, 0, 1, 1]), same_group=True) == pytest.approx(1.0)
    assert np.isnan(ft.random_pair_js_divergence(probs[:1], group[:1], same_group=True))
