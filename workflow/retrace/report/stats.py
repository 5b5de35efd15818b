"""The exact two-sided sign test, by hand (``math.comb``; no scipy).

Under the null hypothesis each untied matched pair is equally likely to favour either side, so the
number of wins among ``n = wins + losses`` pairs is Binomial(n, 1/2). The two-sided p-value doubles
the probability of a split at least as lopsided as the observed one, capped at 1:

    p = min(1, 2 · Σ_{i=0..min(wins, losses)} C(n, i) / 2**n)

Ties (exact equality) carry no sign and are left out of ``n`` by the caller, who reports them.
"""

from __future__ import annotations

import math
from fractions import Fraction


def sign_test_p(wins: int, losses: int) -> float:
    """Exact two-sided sign-test p-value for ``wins`` against ``losses`` (ties already excluded).

    ``sign_test_p(8, 0) == 2 * 0.5**8 == 0.0078125``; with no untied pair at all the test has no
    evidence either way and the p-value is 1.
    """
    if wins < 0 or losses < 0:
        raise ValueError(f"counts must be non-negative, got wins={wins}, losses={losses}")
    n = wins + losses
    if n == 0:
        return 1.0
    k = min(wins, losses)
    tail = Fraction(sum(math.comb(n, i) for i in range(k + 1)), 2**n)
    return float(min(Fraction(1), 2 * tail))


def holm(p_values: list[float]) -> list[float]:
    """Holm's step-down adjusted p-values, in the order given.

    Sort ascending, p_(1) <= ... <= p_(m); the adjusted value of the i-th smallest is
    max_{j<=i} min(1, (m - j + 1) · p_(j)). Rejecting every hypothesis whose adjusted value is <= α
    keeps the family-wise error rate at α whatever the dependence between the tests, which is why
    it suits the steps of one set of runs (strongly dependent). ``holm([0.01, 0.04, 0.03]) ==
    [0.03, 0.06, 0.06]``.
    """
    m = len(p_values)
    order = sorted(range(m), key=lambda i: p_values[i])
    out = [0.0] * m
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p_values[i]))
        out[i] = running
    return out
