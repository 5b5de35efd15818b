"""The exact two-sided sign test against values computed by hand."""

import pytest

from retrace.report.stats import sign_test_p


@pytest.mark.parametrize(
    ("wins", "losses", "expected"),
    [
        (8, 0, 2 * 0.5**8),  # 0.0078125
        (0, 8, 2 * 0.5**8),  # symmetric
        (7, 1, 2 * (1 + 8) / 256),  # 0.0703125
        (6, 2, 2 * (1 + 8 + 28) / 256),  # 0.2890625
        (5, 3, 2 * (1 + 8 + 28 + 56) / 256),  # 0.7265625
        (4, 4, 1.0),  # 2 * 163/256 > 1 → capped
        (10, 0, 2 / 1024),
        (1, 0, 1.0),  # one pair can never be significant
        (0, 0, 1.0),  # no untied pair: no evidence
        (20, 3, 2 * (1 + 23 + 253 + 1771) / 2**23),
    ],
)
def test_sign_test_matches_hand_computed_values(wins, losses, expected):
    assert sign_test_p(wins, losses) == pytest.approx(expected, rel=1e-15, abs=0)


def test_eight_of_eight_is_exactly_0_0078125():
    assert sign_test_p(8, 0) == 0.0078125


def test_large_n_stays_finite_and_exact():
    # 1000 pairs: float arithmetic on 2**1000 would overflow; the Fraction path does not.
    assert 0 < sign_test_p(600, 400) < 1e-9
    assert sign_test_p(500, 500) == 1.0


def test_negative_counts_are_rejected():
    with pytest.raises(ValueError):
        sign_test_p(-1, 3)
