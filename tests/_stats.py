"""Binomial tolerances for claims about stochastic evaluation (EnResNet noise is on at test time,
so one evaluation is one draw)."""
from __future__ import annotations

from math import comb


def binomial_tail(n: int, p: float, k: int) -> float:
    """P(X >= k) for X ~ Binomial(n, p)."""
    return sum(comb(n, i) * p**i * (1 - p) ** (n - i) for i in range(k, n + 1))


def allowed_failures(n: int, p_fail: float, alpha: float = 0.01) -> int:
    """The most failures out of n draws a true claim shows with probability >= 1 - alpha, when a
    single draw fails with probability at most p_fail: the smallest k with P(X > k) <= alpha."""
    for k in range(n + 1):
        if binomial_tail(n, p_fail, k + 1) <= alpha:
            return k
    return n
