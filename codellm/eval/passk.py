"""pass@k with the unbiased estimator of Chen et al. (2021): of n samples of which c pass, the chance that at least
one of k drawn without replacement passes, 1 - C(n-c, k) / C(n, k), computed as a product for stability."""

from __future__ import annotations

import math


def pass_at_k(n: int, c: int, k: int) -> float:
    if not 0 <= c <= n or k < 1:
        raise ValueError(f"need 0 <= c <= n and k >= 1, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def mean_pass_at_k(counts: list[tuple[int, int]], k: int) -> float | None:
    """Over problems of (n, c): the mean, or None when some problem has fewer than k samples."""
    if not counts or any(n < k for n, _ in counts):
        return None
    return sum(pass_at_k(n, c, k) for n, c in counts) / len(counts)
