"""Speculative sampling: a draft model proposes, the target model verifies.

The device (draft, distribution ``q``) samples ``k`` tokens autoregressively;
the edge (target, distribution ``p``) scores the ``k + 1`` positions in one
batched run. Each draft token ``x`` is accepted with probability
``min(1, p(x) / q(x))``; on the first rejection a token is drawn from the
residual ``norm(max(0, p - q))`` and the block ends; if all ``k`` are accepted
a bonus token is drawn from the edge's last distribution. Every emitted token
is then distributed exactly as ``p`` (Leviathan et al. 2023; Chen et al. 2023),
so the output has the edge's quality while most tokens come from drafts.

:class:`AdaptiveK` chooses ``k`` from the recent acceptance rate and the
relative cost of a draft step and an edge call.

Numpy only: no service imports, so the engine and the benchmarks share it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

Array = np.ndarray[Any, Any]


def sample(p: Array, rng: np.random.Generator) -> int:
    """Draws one index from the (not necessarily normalised) non-negative weights ``p``."""
    cdf = np.cumsum(np.asarray(p, dtype=np.float64))
    i = int(np.searchsorted(cdf, rng.random() * cdf[-1], side="right"))
    return min(i, len(cdf) - 1)


def residual(p: Array, q: Array) -> Array:
    """Returns ``norm(max(0, p - q))``, what a rejection samples from (``p`` itself when ``p == q``)."""
    r = np.maximum(np.asarray(p, dtype=np.float64) - np.asarray(q, dtype=np.float64), 0.0)
    total = r.sum()
    if total <= 0.0:
        out: Array = np.asarray(p, dtype=np.float64)
        return out
    scaled: Array = r / total
    return scaled


def accept_probability(p_token: float, q_token: float) -> float:
    """Returns ``min(1, p / q)`` for a draft token the draft gave probability ``q_token``."""
    if q_token <= 0.0:
        return 1.0  # never drafted: any value is fine, it has probability 0
    return min(1.0, p_token / q_token)


def output_distribution(p: Array, q: Array) -> Array:
    """Returns the exact distribution of one token emitted by the rule (draft from ``q``, verify against ``p``).

    ``q(x) min(1, p(x)/q(x)) + P(reject) residual(x)``, which equals ``p``:
    used to check the rule, not to sample.
    """
    p64 = np.asarray(p, dtype=np.float64)
    q64 = np.asarray(q, dtype=np.float64)
    accepted = np.minimum(p64, q64)
    out: Array = accepted + (1.0 - accepted.sum()) * residual(p64, q64)
    return out


@dataclass(frozen=True)
class Verified:
    """The outcome of verifying one block of drafts.

    Attributes:
        tokens: The tokens to emit: the accepted drafts, then one residual or bonus token.
        accepted: How many drafts were accepted (``len(tokens) - 1``).
        drafted: How many drafts were proposed.
    """

    tokens: list[int]
    accepted: int
    drafted: int


def verify(draft: Sequence[int], q: Array, p: Array, rng: np.random.Generator) -> Verified:
    """Applies the speculative-sampling rule to one block.

    Args:
        draft: The ``k`` drafted token ids.
        q: ``[k, V]`` the draft model's distributions the drafts were sampled from.
        p: ``[k + 1, V]`` the target model's distributions at the same positions plus the next.
        rng: Source of the uniform draws.
    """
    k = len(draft)
    if q.shape[0] != k or p.shape[0] != k + 1:
        raise ValueError(f"verify needs q [k, V] and p [k+1, V] for k={k}, got {q.shape} and {p.shape}")
    tokens: list[int] = []
    for i, tok in enumerate(draft):
        if rng.random() < accept_probability(float(p[i, tok]), float(q[i, tok])):
            tokens.append(int(tok))
            continue
        tokens.append(sample(residual(p[i], q[i]), rng))
        return Verified(tokens, i, k)
    tokens.append(sample(p[k], rng))
    return Verified(tokens, k, k)


def expected_tokens_per_call(alpha: float, k: int) -> float:
    """Expected tokens emitted per verification of ``k`` drafts when each is accepted with probability ``alpha``.

    ``(1 - alpha^(k+1)) / (1 - alpha)``: accepted drafts plus the one residual or bonus token.
    """
    if alpha >= 1.0:
        return float(k + 1)
    return (1.0 - alpha ** (k + 1)) / (1.0 - alpha)


def best_k(alpha: float, cost_ratio: float, k_min: int = 1, k_max: int = 8) -> int:
    """Returns the ``k`` maximising expected tokens per unit time.

    Args:
        alpha: Per-token acceptance probability.
        cost_ratio: Time of one draft step divided by the time of one edge call
            (including its round trip); a block costs ``k * cost_ratio + 1``.
        k_min: Smallest ``k`` allowed.
        k_max: Largest ``k`` allowed.
    """
    return max(
        range(k_min, k_max + 1),
        key=lambda k: expected_tokens_per_call(alpha, k) / (k * cost_ratio + 1.0),
    )


class AdaptiveK:
    """Chooses ``k`` from an exponentially decayed estimate of the acceptance rate.

    After each block, accepted drafts count as successes and a rejection as
    one failure (drafts after a rejection were never tried); both counts decay
    by ``decay`` per block. ``k`` is :func:`best_k` of the estimate.

    Args:
        cost_ratio: Draft step time ÷ edge call time (see :func:`best_k`).
        k_min: Smallest ``k``.
        k_max: Largest ``k``.
        decay: Per-block decay of the counts (0.9: about the last 10 blocks).
        prior_alpha: Initial acceptance estimate, weighted as ``prior_weight`` trials.
        prior_weight: Trials the prior is worth.
    """

    def __init__(
        self,
        cost_ratio: float,
        k_min: int = 1,
        k_max: int = 8,
        decay: float = 0.9,
        prior_alpha: float = 0.6,
        prior_weight: float = 4.0,
    ) -> None:
        if not 1 <= k_min <= k_max:
            raise ValueError("need 1 <= k_min <= k_max")
        self.cost_ratio = cost_ratio
        self.k_min = k_min
        self.k_max = k_max
        self.decay = decay
        self._successes = prior_alpha * prior_weight
        self._trials = prior_weight

    @property
    def alpha(self) -> float:
        """The current acceptance-rate estimate."""
        return self._successes / self._trials if self._trials > 0 else 0.0

    @property
    def k(self) -> int:
        """The number of tokens to draft next."""
        return best_k(self.alpha, self.cost_ratio, self.k_min, self.k_max)

    def update(self, result: Verified) -> None:
        """Records one verified block."""
        rejected = 1 if result.accepted < result.drafted else 0
        self._successes = self.decay * self._successes + result.accepted
        self._trials = self.decay * self._trials + result.accepted + rejected


def total_variation(a: Array, b: Array) -> float:
    """Returns half the L1 distance between two distributions."""
    return 0.5 * float(np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)).sum())


def tv_bound(p: Array, n: int, delta: float = 0.01) -> float:
    """Returns a bound the TV distance between ``n`` i.i.d. draws from ``p`` and ``p`` exceeds with prob ≤ ``delta``.

    ``E[TV] <= 1/2 sum sqrt(p (1 - p) / n)`` (Jensen), plus McDiarmid's
    ``sqrt(ln(1/delta) / (2n))`` (one draw moves the TV by at most ``1/n``).
    """
    p64 = np.asarray(p, dtype=np.float64)
    mean_bound = 0.5 * float(np.sqrt(p64 * (1.0 - p64) / n).sum())
    return mean_bound + math.sqrt(math.log(1.0 / delta) / (2.0 * n))
