"""``python -m bench.token_signal``: which confidence signal should a *sampling* token-level cascade use?

Issue 11 asks whether a device should keep a token when the distribution's
maximum probability clears the threshold (decided before sampling) or when the
probability of the token it actually sampled does (decided after sampling; on
a miss the token is resampled from the edge's distribution). With greedy
decoding both are the same number; with sampling they are not.

Exact, not sampled: on held-out positions (the evaluation split of
:mod:`bench.cascade`) with device distribution ``q`` and edge distribution
``p`` (both at the sampling temperature, padding and unknown removed), the
probability that the emitted token is the true next character is

* max probability: ``q_T(y)`` where ``max q ≥ t``, else ``p_T(y)``;
* chosen-token probability: ``q_T(y)·[q(y) ≥ t] + q_T({x : q(x) < t})·p_T(y)``,

and the expected share of tokens kept local is ``[max q ≥ t]`` and
``q_T({x : q(x) ≥ t})`` respectively. Both are swept over thresholds; the
table gives the share of the edge's gain (over the device) each recovers at a
given local share. Nothing is asserted.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import numpy as np

from bench.cascade import MODELS_DIR, CharLM, score, split_docs
from examples.charlm.corpus import build_corpus
from services.engine.generation import PAD_ID, UNK_ID

Array = np.ndarray[Any, Any]
THRESHOLDS = np.linspace(0.0, 1.0, 401)
SHARES = (0.3, 0.4, 0.5, 0.6, 0.7)


def tempered(probs: Array, temperature: float) -> Array:
    """The sampling distribution of ``services.engine.generation.choose`` (no top-k) at ``temperature``."""
    p = np.asarray(probs, dtype=np.float64).copy()
    p[:, [PAD_ID, UNK_ID]] = 0.0
    if temperature == 0:
        out = np.zeros_like(p)
        out[np.arange(len(p)), p.argmax(axis=1)] = 1.0
        return out
    with np.errstate(divide="ignore"):
        logits = np.log(p) / temperature
    logits -= logits.max(axis=1, keepdims=True)
    w = np.exp(logits)
    out_t: Array = w / w.sum(axis=1, keepdims=True)
    return out_t


def curves(q: Array, p: Array, labels: Array, temperature: float) -> dict[str, tuple[Array, Array]]:
    """``signal → (local share [T], expected accuracy [T])`` over :data:`THRESHOLDS`."""
    qt, pt = tempered(q, temperature), tempered(p, temperature)
    rows = np.arange(len(labels))
    q_true, p_true = qt[rows, labels], pt[rows, labels]
    raw_true = q[rows, labels]
    qmax = q.max(axis=1)
    out: dict[str, tuple[Array, Array]] = {}
    share, acc = [], []
    for t in THRESHOLDS:
        local = qmax >= t
        share.append(local.mean())
        acc.append(np.where(local, q_true, p_true).mean())
    out["max_prob"] = (np.array(share), np.array(acc))
    share, acc = [], []
    for t in THRESHOLDS:
        kept = q >= t
        mass_kept = (qt * kept).sum(axis=1)
        share.append(mass_kept.mean())
        acc.append((q_true * (raw_true >= t) + (1.0 - mass_kept) * p_true).mean())
    out["chosen_prob"] = (np.array(share), np.array(acc))
    return out


def gain_at(share: Array, acc: Array, target: float, dev: float, edge: float) -> float:
    """Gain recovered at ``target`` local share (linear interpolation along the curve)."""
    order = np.argsort(share)
    return float((np.interp(target, share[order], acc[order]) - dev) / (edge - dev))


def best_point(share: Array, acc: Array, dev: float, edge: float, min_gain: float = 0.95) -> tuple[float, float]:
    """``(local share, threshold)`` of the most local threshold recovering ≥ ``min_gain`` of the gain."""
    ok = np.flatnonzero((acc - dev) / (edge - dev) >= min_gain)
    if ok.size == 0:
        return 0.0, float("nan")
    i = int(ok[np.argmax(share[ok])])
    return float(share[i]), float(THRESHOLDS[i])


def main(argv: list[str] | None = None) -> int:
    """Entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--positions", type=int, default=20_000)
    parser.add_argument("--variant", choices=("int8", "fp32"), default="int8")
    args = parser.parse_args(argv)
    suffix = ".int8.onnx" if args.variant == "int8" else ".onnx"
    device = CharLM.load(MODELS_DIR / f"charlm-device{suffix}", 2)
    edge = CharLM.load(MODELS_DIR / f"charlm-edge{suffix}", 2)
    evaluation_docs, _ = split_docs(build_corpus().heldout_docs)
    scored = score(device, edge, evaluation_docs, args.positions)
    q = scored.device.astype(np.float64)
    p = scored.edge.astype(np.float64)
    print(f"{args.variant}, {len(scored.labels)} held-out positions; gain recovered at a local share of:")
    print(
        f"{'T':>5} {'signal':<12} {'device':>7} {'edge':>7} "
        + " ".join(f"{s:>6.0%}" for s in SHARES)
        + "   most local with ≥95 % gain (threshold)"
    )
    for temperature in (1.0, 0.8, 0.0):
        rows = np.arange(len(scored.labels))
        dev = float(tempered(q, temperature)[rows, scored.labels].mean())
        edg = float(tempered(p, temperature)[rows, scored.labels].mean())
        for name, (share, acc) in curves(q, p, scored.labels, temperature).items():
            gains = " ".join(f"{gain_at(share, acc, s, dev, edg):>6.1%}" for s in SHARES)
            local, threshold = best_point(share, acc, dev, edg)
            print(f"{temperature:>5} {name:<12} {dev:>7.2%} {edg:>7.2%} {gains}   {local:.1%} ({threshold:.3f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
