"""The pure functions behind the confidence cascade and speculative decoding (issue 11)."""

from __future__ import annotations

import numpy as np
import pytest

from services.engine import confidence as conf
from services.engine import speculative as spec


def _dist(rng: np.random.Generator, v: int, alpha: float = 0.5) -> np.ndarray:
    return rng.dirichlet(np.full(v, alpha))


@pytest.mark.parametrize("seed", range(20))
def test_speculative_rule_preserves_target_distribution_exactly(seed: int) -> None:
    rng = np.random.default_rng(seed)
    p, q = _dist(rng, 7), _dist(rng, 7)
    if seed % 5 == 0:
        q[rng.integers(7)] = 0.0  # a token the draft can never propose
        q /= q.sum()
    np.testing.assert_allclose(spec.output_distribution(p, q), p, atol=1e-12)


def test_speculative_rule_with_equal_distributions_accepts_everything() -> None:
    p = np.array([0.5, 0.3, 0.2])
    np.testing.assert_allclose(spec.output_distribution(p, p), p)
    np.testing.assert_allclose(spec.residual(p, p), p)
    assert spec.accept_probability(0.3, 0.3) == 1.0
    assert spec.accept_probability(0.1, 0.4) == pytest.approx(0.25)


def test_verify_sampled_first_token_follows_target() -> None:
    rng = np.random.default_rng(1)
    p, q = np.array([0.1, 0.6, 0.3]), np.array([0.7, 0.1, 0.2])
    n = 20_000
    counts = np.zeros(3)
    for _ in range(n):
        draft = [spec.sample(q, rng)]
        counts[spec.verify(draft, q[None, :], np.stack([p, p]), rng).tokens[0]] += 1
    assert spec.total_variation(counts / n, p) <= spec.tv_bound(p, n, 0.001)


def test_verify_block_shapes_and_bonus_token() -> None:
    rng = np.random.default_rng(0)
    p = np.array([[0.0, 1.0], [0.0, 1.0], [1.0, 0.0]])
    q = np.array([[0.0, 1.0], [0.0, 1.0]])
    result = spec.verify([1, 1], q, p, rng)
    assert result.tokens == [1, 1, 0]  # both accepted (p == q), bonus from p[2]
    assert (result.accepted, result.drafted) == (2, 2)
    rejected = spec.verify([1], np.array([[0.0, 1.0]]), np.array([[1.0, 0.0], [0.5, 0.5]]), rng)
    assert rejected.tokens == [0]
    assert rejected.accepted == 0
    with pytest.raises(ValueError, match="k\\+1"):
        spec.verify([1], q, p, rng)


def test_expected_tokens_and_best_k() -> None:
    assert spec.expected_tokens_per_call(0.0, 5) == pytest.approx(1.0)
    assert spec.expected_tokens_per_call(1.0, 5) == 6.0
    assert spec.expected_tokens_per_call(0.5, 2) == pytest.approx(1.75)
    # Free drafts and a good acceptance rate: draft as much as allowed; expensive drafts: as little.
    assert spec.best_k(0.9, 0.0, 1, 8) == 8
    assert spec.best_k(0.3, 1.0, 1, 8) == 1


def test_adaptive_k_follows_acceptance() -> None:
    policy = spec.AdaptiveK(cost_ratio=0.05, k_min=1, k_max=8)
    for _ in range(30):
        policy.update(spec.Verified([0] * 9, 8, 8))
    assert policy.alpha > 0.95
    assert policy.k == 8
    for _ in range(60):  # rejections at the first draft: one failed trial per block
        policy.update(spec.Verified([0], 0, policy.k))
    assert policy.alpha < 0.1
    assert policy.k == 1
    with pytest.raises(ValueError, match="k_min"):
        spec.AdaptiveK(0.1, k_min=0)


def test_signals_on_known_rows() -> None:
    probs = np.array([[1.0, 0.0, 0.0, 0.0], [0.25, 0.25, 0.25, 0.25], [0.5, 0.3, 0.1, 0.1]])
    np.testing.assert_allclose(conf.max_probability(probs), [1.0, 0.25, 0.5])
    np.testing.assert_allclose(conf.margin(probs), [1.0, 0.0, 0.2])
    ne = conf.neg_entropy(probs)
    assert ne[0] == pytest.approx(1.0)
    assert ne[1] == pytest.approx(0.0, abs=1e-12)
    assert 0.0 < ne[2] < 1.0
    assert conf.features(probs).shape == (3, 3)


def test_auroc() -> None:
    assert conf.auroc(np.array([0.1, 0.2, 0.8, 0.9]), np.array([0, 0, 1, 1])) == 1.0
    assert conf.auroc(np.array([0.9, 0.8, 0.2, 0.1]), np.array([0, 0, 1, 1])) == 0.0
    assert conf.auroc(np.array([0.5, 0.5, 0.5, 0.5]), np.array([0, 1, 0, 1])) == 0.5
    # One inversion out of 2 × 2 pairs; a tie counts half.
    assert conf.auroc(np.array([0.1, 0.6, 0.5, 0.9]), np.array([0, 0, 1, 1])) == pytest.approx(0.75)
    assert conf.auroc(np.array([0.1, 0.5, 0.5, 0.9]), np.array([0, 0, 1, 1])) == pytest.approx(0.875)
    with pytest.raises(ValueError, match="positive and negative"):
        conf.auroc(np.array([0.1, 0.2]), np.array([1, 1]))


def test_threshold_sweep_and_full_curve() -> None:
    c = np.array([0.9, 0.8, 0.8, 0.3, 0.1])
    dev = np.array([1, 1, 0, 0, 1], dtype=bool)
    edge = np.array([1, 0, 1, 1, 0], dtype=bool)
    curve = conf.sweep(c, dev, edge, np.array([0.0, 0.5, 0.85, 1.0]))
    np.testing.assert_allclose(curve.local_share, [1.0, 0.6, 0.2, 0.0])
    np.testing.assert_allclose(curve.accuracy, [3 / 5, 3 / 5, 3 / 5, 3 / 5])
    full = conf.full_curve(c, dev, edge)
    # Cuts only between distinct values: after 0.9, after both 0.8s, after 0.3, after 0.1.
    np.testing.assert_allclose(full.local_share, [0.2, 0.6, 0.8, 1.0])
    np.testing.assert_allclose(full.thresholds, [0.9, 0.8, 0.3, 0.1])
    again = conf.sweep(c, dev, edge, full.thresholds)
    np.testing.assert_allclose(again.accuracy, full.accuracy)
    np.testing.assert_allclose(again.local_share, full.local_share)


def test_gain_recovered_and_best_local_share() -> None:
    curve = conf.CascadeCurve(np.array([0.9, 0.5, 0.1]), np.array([0.2, 0.5, 1.0]), np.array([0.64, 0.63, 0.57]))
    np.testing.assert_allclose(conf.gain_recovered(curve.accuracy, 0.57, 0.63), [7 / 6, 1.0, 0.0])
    assert conf.best_local_share(curve, 0.57, 0.63, 0.95) == (0.5, 0.5)
    assert conf.best_local_share(curve, 0.57, 0.63, 1.5) is None


def test_calibrated_score_fit_and_metadata_round_trip() -> None:
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.full(6, 0.3), size=4000)
    correct = rng.random(4000) < probs.max(axis=1)  # argmax right with its own probability: calibrated
    score = conf.fit_calibrated_score(probs, correct)
    s = score(probs)
    assert s.shape == (4000,)
    assert np.all((s > 0) & (s < 1))
    assert abs(float(s.mean()) - float(correct.mean())) < 0.01  # logistic regression matches the base rate
    assert conf.auroc(s, correct) > 0.6
    back = conf.CalibratedScore.from_properties({conf.CALIBRATION_PROPERTY: score.to_property()})
    assert back == score
    assert conf.CalibratedScore.from_properties({}) is None
    assert conf.CalibratedScore.from_properties({conf.CALIBRATION_PROPERTY: "{"}) is None
    bad = '{"features": ["max_prob"], "weights": [1.0], "bias": 0.0}'
    assert conf.CalibratedScore.from_properties({conf.CALIBRATION_PROPERTY: bad}) is None
