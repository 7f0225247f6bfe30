"""``python -m bench.cascade``: the confidence cascade and speculative decoding of issue 11, measured offline.

With the demo char-LMs (``examples/models``: ``charlm-device`` drafts/serves
locally, ``charlm-edge`` is the larger model) on the demo corpus's held-out
docstrings, in-process onnxruntime:

1. **Accuracy.** Next-character accuracy (argmax = true next character) of the
   device alone and the edge alone on ``--positions`` evenly spaced held-out
   positions (sliding context windows, batched runs).
2. **Token-level cascade** (teacher-forced on the held-out text): keep the
   device's argmax where its confidence ≥ a threshold, else take the edge's.
   Signals: max probability, margin (top1 − top2), negative entropy
   (``1 − H/ln V``) and a calibrated score (logistic regression over the three,
   ``services.engine.confidence``). The held-out documents are split by a hash
   of their text: a quarter is the *calibration split* (the score is fitted
   and thresholds are chosen there), the rest the *evaluation split* every
   figure is reported on; the two share no document.
3. **Speculative decoding** with the real models (temperature 1, fixed seed):
   the device drafts ``k`` tokens, the edge scores the ``k + 1`` positions in one
   batched run, ``services.engine.speculative.verify`` accepts or resamples.
   ``k`` fixed 1..8 and adaptive (``AdaptiveK``). Acceptance, edge calls per
   token, wall-clock tokens/s against edge-only and device-only generation, and
   a *modelled* figure that adds an assumed round trip per edge call. A
   statistical check draws many single tokens through the rule at fixed
   contexts and compares their histogram with the edge's distribution.

Writes ``summary.json`` and ``cascade.svg`` (accuracy vs local share) into
``--out``. Nothing is asserted.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import platform
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from rich.console import Console
from rich.table import Table

from examples.charlm.corpus import build_corpus, make_stream
from services.engine import confidence as conf
from services.engine import speculative as spec
from services.engine.generation import PAD_ID, UNK_ID, CharTokenizer

Array = np.ndarray[Any, Any]

ROOT = Path(__file__).resolve().parents[1]
MODELS_DIR = ROOT / "examples" / "models"
DEFAULT_OUT = ROOT / "bench" / "results" / "cascade"
MIN_GAIN = 0.95
LOCAL_GOAL = 0.5
SIGNAL_NAMES = ("max_prob", "margin", "neg_entropy", "calibrated")
GRID = np.round(np.linspace(0.0, 1.0, 51), 4)


@dataclass
class CharLM:
    """One demo model: an onnxruntime session and its tokenizer."""

    name: str
    session: ort.InferenceSession
    tokenizer: CharTokenizer
    input_name: str = field(init=False)

    def __post_init__(self) -> None:
        self.input_name = self.session.get_inputs()[0].name

    @classmethod
    def load(cls, path: Path, threads: int) -> CharLM:
        """Opens ``path`` with ``threads`` intra-op threads."""
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        tokenizer = CharTokenizer.from_properties(session.get_modelmeta().custom_metadata_map)
        return cls(path.name, session, tokenizer)

    @property
    def context(self) -> int:
        """The model's context length."""
        return self.tokenizer.context_length

    def run(self, windows: Array) -> Array:
        """Returns ``probs`` ``[B, V]`` for ``[B, C]`` windows in one run."""
        out: Array = self.session.run(None, {self.input_name: windows})[0]
        return out

    def run_batched(self, windows: Array, batch: int = 512) -> Array:
        """Returns ``probs`` for many windows, ``batch`` per run."""
        return np.concatenate([self.run(windows[i : i + batch]) for i in range(0, len(windows), batch)])


def split_docs(docs: Sequence[str]) -> tuple[list[str], list[str]]:
    """Splits held-out documents into (evaluation, calibration) by a SHA-256 of their text (1 in 4 calibrates)."""
    evaluation: list[str] = []
    calibration: list[str] = []
    for doc in docs:
        (calibration if hashlib.sha256(doc.encode()).digest()[0] % 4 == 0 else evaluation).append(doc)
    return evaluation, calibration


def sample_positions(docs: Sequence[str], vocab: list[str], context: int, n: int) -> tuple[Array, Array]:
    """``n`` evenly spaced next-character positions of ``docs``: ``([n, context] windows, [n] labels)``."""
    stream = make_stream(docs, vocab, context)
    pick = np.linspace(0, len(stream.targets) - 1, num=min(n, len(stream.targets))).round().astype(np.int64)
    return stream.windows(stream.targets[pick])


@dataclass
class Scored:
    """Both models' distributions at a set of positions."""

    device: Array
    edge: Array
    labels: Array
    windows: Array

    @property
    def device_correct(self) -> Array:
        """Whether the device's argmax is the true next character."""
        out: Array = self.device.argmax(axis=1) == self.labels
        return out

    @property
    def edge_correct(self) -> Array:
        """Whether the edge's argmax is the true next character."""
        out: Array = self.edge.argmax(axis=1) == self.labels
        return out


def score(device: CharLM, edge: CharLM, docs: Sequence[str], n: int) -> Scored:
    """Runs both models on ``n`` positions of ``docs`` (the device sees the last ``C_device`` of each edge window)."""
    windows, labels = sample_positions(docs, edge.tokenizer.vocab, edge.context, n)
    return Scored(
        device.run_batched(windows[:, -device.context :]), edge.run_batched(windows, batch=128), labels, windows
    )


def signals(probs: Array, calibrated: conf.CalibratedScore) -> dict[str, Array]:
    """Every confidence signal of the device's distributions."""
    out = {name: fn(probs) for name, fn in conf.SIGNALS.items()}
    out["calibrated"] = calibrated(probs)
    return out


def cascade_report(evaluation: Scored, calibration: Scored) -> dict[str, Any]:
    """Accuracy, sweeps, best local shares and AUROCs of every signal."""
    dev_ok, edge_ok = evaluation.device_correct, evaluation.edge_correct
    dev_acc, edge_acc = float(dev_ok.mean()), float(edge_ok.mean())
    cal_dev_ok, cal_edge_ok = calibration.device_correct, calibration.edge_correct
    cal_dev_acc, cal_edge_acc = float(cal_dev_ok.mean()), float(cal_edge_ok.mean())
    calibrated = conf.fit_calibrated_score(calibration.device, cal_dev_ok)
    eval_signals = signals(evaluation.device, calibrated)
    cal_signals = signals(calibration.device, calibrated)
    per_signal: dict[str, Any] = {}
    for name in SIGNAL_NAMES:
        c = eval_signals[name]
        grid = conf.sweep(c, dev_ok, edge_ok, GRID)
        full = conf.full_curve(c, dev_ok, edge_ok)
        best = conf.best_local_share(full, dev_acc, edge_acc, MIN_GAIN)
        # The deployable figure: threshold picked on the calibration split, applied to the evaluation split.
        cal_best = conf.best_local_share(
            conf.full_curve(cal_signals[name], cal_dev_ok, cal_edge_ok), cal_dev_acc, cal_edge_acc, MIN_GAIN
        )
        transfer: dict[str, float] | None = None
        if cal_best is not None:
            at = conf.sweep(c, dev_ok, edge_ok, np.array([cal_best[1]]))
            transfer = {
                "threshold": cal_best[1],
                "local_share": float(at.local_share[0]),
                "accuracy": float(at.accuracy[0]),
                "gain_recovered": float(conf.gain_recovered(at.accuracy[0], dev_acc, edge_acc)),
            }
        per_signal[name] = {
            "auroc_device_correct": conf.auroc(c, dev_ok),
            "best_local_share_at_95": None if best is None else best[0],
            "best_threshold_at_95": None if best is None else best[1],
            "reaches_50_local": best is not None and best[0] >= LOCAL_GOAL,
            "gain_at_local_share": gain_at_shares(full, dev_acc, edge_acc),
            "threshold_chosen_on_calibration": transfer,
            "sweep": {
                "threshold": grid.thresholds.tolist(),
                "local_share": np.round(grid.local_share, 5).tolist(),
                "accuracy": np.round(grid.accuracy, 5).tolist(),
            },
            "_curve": full,
        }
    return {
        "device_accuracy": dev_acc,
        "edge_accuracy": edge_acc,
        "oracle_accuracy": float((dev_ok | edge_ok).mean()),
        "positions": len(dev_ok),
        "calibration_positions": len(cal_dev_ok),
        "calibration_device_accuracy": cal_dev_acc,
        "calibration_edge_accuracy": cal_edge_acc,
        "calibrated_score": {"features": list(conf.FEATURES), "weights": calibrated.weights, "bias": calibrated.bias},
        "calibrated_score_property": {conf.CALIBRATION_PROPERTY: calibrated.to_property()},
        "signals": per_signal,
    }


SHARES = (0.3, 0.4, 0.5, 0.6, 0.7)


def gain_at_shares(curve: conf.CascadeCurve, dev_acc: float, edge_acc: float) -> dict[str, float]:
    """Gain recovered at the cut closest to each local share in :data:`SHARES` (at least that local)."""
    out: dict[str, float] = {}
    for share in SHARES:
        i = int(np.searchsorted(curve.local_share, share))
        i = min(i, len(curve.local_share) - 1)
        out[f"{share:.1f}"] = float(conf.gain_recovered(curve.accuracy[i], dev_acc, edge_acc))
    return out


# --- speculative decoding -------------------------------------------------


def normalise(probs: Array) -> Array:
    """Sampling distribution at temperature 1 as the engine samples: PAD and UNK never chosen."""
    p = np.array(probs, dtype=np.float64)
    p[..., PAD_ID] = 0.0
    p[..., UNK_ID] = 0.0
    out: Array = p / p.sum(axis=-1, keepdims=True)
    return out


def window(ids: list[int], context: int) -> list[int]:
    """The last ``context`` ids, left-padded with PAD."""
    tail = ids[-context:]
    return [PAD_ID] * (context - len(tail)) + tail


@dataclass
class GenStats:
    """Counts and timing of one generation mode over all prompts."""

    mode: str
    tokens: int = 0
    seconds: float = 0.0
    edge_calls: int = 0
    edge_rows: int = 0
    device_steps: int = 0
    drafted: int = 0
    accepted: int = 0
    rejections: int = 0
    ks: list[int] = field(default_factory=list)
    edge_logprob: float = 0.0

    def as_dict(self, rtt_s: float) -> dict[str, Any]:
        """The reported figures (``modelled_*`` add ``rtt_s`` per edge call to the measured time)."""
        modelled = self.seconds + self.edge_calls * rtt_s
        blocks = max(len(self.ks), 1)
        return {
            "mode": self.mode,
            "tokens": self.tokens,
            "seconds": self.seconds,
            "tokens_per_s": self.tokens / self.seconds if self.seconds else 0.0,
            "modelled_tokens_per_s": self.tokens / modelled if modelled else 0.0,
            "edge_calls": self.edge_calls,
            "edge_calls_per_token": self.edge_calls / self.tokens if self.tokens else 0.0,
            "edge_rows_per_token": self.edge_rows / self.tokens if self.tokens else 0.0,
            "tokens_per_edge_call": self.tokens / self.edge_calls if self.edge_calls else None,
            "device_steps": self.device_steps,
            "drafted": self.drafted,
            "accepted": self.accepted,
            "acceptance_rate": self.accepted / self.drafted if self.drafted else None,
            "per_token_acceptance": (
                self.accepted / (self.accepted + self.rejections) if self.accepted + self.rejections else None
            ),
            "draft_share": self.accepted / self.tokens if self.tokens else 0.0,
            "mean_k": float(np.mean(self.ks)) if self.ks else None,
            "mean_block_tokens": self.tokens / blocks if self.ks else None,
            "edge_mean_logprob": self.edge_logprob / self.tokens if self.tokens else None,
        }


def plain(model: CharLM, prompts: list[list[int]], n: int, seed: int, mode: str) -> GenStats:
    """Token-by-token sampling from one model (one batch-1 run per token)."""
    stats = GenStats(mode)
    rng = np.random.default_rng(seed)
    start = time.perf_counter()
    for prompt in prompts:
        ids = list(prompt)
        for _ in range(n):
            p = normalise(model.run(np.asarray([window(ids, model.context)], dtype=np.int64))[0])
            tok = spec.sample(p, rng)
            ids.append(tok)
            if mode == "edge-only":
                stats.edge_logprob += math.log(p[tok])
        stats.tokens += n
    stats.seconds = time.perf_counter() - start
    if mode == "edge-only":
        stats.edge_calls = stats.edge_rows = stats.tokens
    else:
        stats.device_steps = stats.tokens
    return stats


def run_speculative(
    device: CharLM, edge: CharLM, prompts: list[list[int]], n: int, seed: int, mode: str, policy: spec.AdaptiveK | int
) -> GenStats:
    """Speculative sampling of ``n`` tokens per prompt; ``policy`` is a fixed ``k`` or an :class:`AdaptiveK`."""
    stats = GenStats(mode)
    rng = np.random.default_rng(seed)
    dc, ec = device.context, edge.context
    start = time.perf_counter()
    for prompt in prompts:
        ids = list(prompt)
        produced = 0
        while produced < n:
            k = policy if isinstance(policy, int) else policy.k
            drafts: list[int] = []
            qs = np.empty((k, len(device.tokenizer.vocab)))
            for i in range(k):
                qs[i] = normalise(device.run(np.asarray([window(ids + drafts, dc)], dtype=np.int64))[0])
                drafts.append(spec.sample(qs[i], rng))
            rows = np.asarray([window(ids + drafts[:i], ec) for i in range(k + 1)], dtype=np.int64)
            ps = normalise(edge.run(rows))
            result = spec.verify(drafts, qs, ps, rng)
            if not isinstance(policy, int):
                policy.update(result)
            for i, tok in enumerate(result.tokens):
                stats.edge_logprob += math.log(ps[i, tok])
            ids.extend(result.tokens)
            produced += len(result.tokens)
            stats.tokens += len(result.tokens)
            stats.edge_calls += 1
            stats.edge_rows += k + 1
            stats.device_steps += k
            stats.drafted += k
            stats.accepted += result.accepted
            stats.rejections += int(result.accepted < k)
            stats.ks.append(k)
    stats.seconds = time.perf_counter() - start
    return stats


def best_of(repeats: int, run: Callable[[], GenStats]) -> GenStats:
    """Runs a (seeded, so identical) generation ``repeats`` times and keeps the fastest wall time."""
    first = run()
    for _ in range(repeats - 1):
        first.seconds = min(first.seconds, run().seconds)
    return first


def median_seconds(fn: Callable[[], object], repeats: int = 200) -> float:
    """Median wall time of ``fn`` after a warm-up."""
    for _ in range(10):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def call_costs(device: CharLM, edge: CharLM, rtt_s: float) -> dict[str, float]:
    """Measured step costs and the draft ÷ edge-call cost ratios ``AdaptiveK`` uses.

    A block of ``k`` drafts costs ``k * t_draft + t_edge(k + 1) (+ RTT)`` with
    ``t_edge(b) = a + b * r`` fitted at ``b = 1`` and ``b = 9``; that is
    ``(a + r + RTT) + k * (t_draft + r)``, so ``cost_ratio = (t_draft + r) / (a + r + RTT)``.
    """
    dwin = np.zeros((1, device.context), dtype=np.int64)
    t_draft = median_seconds(lambda: normalise(device.run(dwin)))
    t1 = median_seconds(lambda: edge.run(np.zeros((1, edge.context), dtype=np.int64)))
    t9 = median_seconds(lambda: edge.run(np.zeros((9, edge.context), dtype=np.int64)))
    r = max((t9 - t1) / 8, 0.0)
    a = max(t1 - r, 0.0)
    return {
        "device_step_s": t_draft,
        "edge_call_b1_s": t1,
        "edge_call_b9_s": t9,
        "edge_per_row_s": r,
        "edge_fixed_s": a,
        "cost_ratio_in_process": (t_draft + r) / (a + r),
        "cost_ratio_with_rtt": (t_draft + r) / (a + r + rtt_s),
    }


def distribution_check(
    device: CharLM, edge: CharLM, evaluation: Scored, draws: int, seed: int, contexts: int = 3
) -> list[dict[str, Any]]:
    """Draws single tokens through :func:`verify` (k = 1) at fixed contexts and compares them with ``p_edge``.

    Contexts are the evaluation positions where the device and edge
    distributions differ most (so a wrong rule would show); the TV bound holds
    with probability 0.99 for draws that truly follow ``p_edge``.
    """
    q_all, p_all = normalise(evaluation.device), normalise(evaluation.edge)
    tv_qp = 0.5 * np.abs(q_all - p_all).sum(axis=1)
    picks = [
        int(np.argmax(tv_qp)),
        int(np.argsort(tv_qp)[int(len(tv_qp) * 0.9)]),
        int(np.argsort(tv_qp)[len(tv_qp) // 2]),
    ]
    rng = np.random.default_rng(seed)
    out = []
    for idx in picks[:contexts]:
        q, p = q_all[idx], p_all[idx]
        counts = np.zeros(len(p))
        qs, ps = q[None, :], np.stack([p, p])
        for _ in range(draws):
            draft = [spec.sample(q, rng)]
            counts[spec.verify(draft, qs, ps, rng).tokens[0]] += 1
        emp = counts / draws
        chi2, dof = pooled_chi2(counts, p)
        out.append(
            {
                "position": idx,
                "context_text": "".join(edge.tokenizer.decode(int(t)) for t in evaluation.windows[idx]),
                "draws": draws,
                "tv_device_vs_edge": spec.total_variation(q, p),
                "tv_speculative_vs_edge": spec.total_variation(emp, p),
                "tv_bound_99": spec.tv_bound(p, draws, 0.01),
                "chi2": chi2,
                "dof": dof,
                "chi2_p_value": chi2_sf(chi2, dof),
                "analytic_max_abs_error": float(np.abs(spec.output_distribution(p, q) - p).max()),
            }
        )
    return out


def pooled_chi2(counts: Array, p: Array, min_expected: float = 5.0) -> tuple[float, int]:
    """Pearson's chi-square of ``counts`` against ``p``, tokens expected fewer than ``min_expected`` times pooled."""
    expected = counts.sum() * p
    big = expected >= min_expected
    obs = np.append(counts[big], counts[~big].sum())
    exp = np.append(expected[big], expected[~big].sum())
    keep = exp > 0
    return float(((obs[keep] - exp[keep]) ** 2 / exp[keep]).sum()), int(keep.sum()) - 1


def chi2_sf(x: float, dof: int) -> float:
    """Upper tail of the chi-square distribution (Wilson-Hilferty normal approximation)."""
    if dof <= 0:
        return 1.0
    z = ((x / dof) ** (1 / 3) - (1 - 2 / (9 * dof))) / math.sqrt(2 / (9 * dof))
    return 0.5 * math.erfc(z / math.sqrt(2))


def speculative_report(
    device_path: Path, edge_path: Path, evaluation_docs: list[str], evaluation: Scored, args: argparse.Namespace
) -> dict[str, Any]:
    """Generation from device only, edge only and speculatively (fixed and adaptive k)."""
    device, edge = CharLM.load(device_path, 1), CharLM.load(edge_path, 1)  # one thread: a device, one request
    rtt_s = args.rtt_ms / 1000.0
    costs = call_costs(device, edge, rtt_s)
    step = max(len(evaluation_docs) // args.prompts, 1)
    prompts = [edge.tokenizer.encode(d[: args.prompt_chars]) for d in evaluation_docs[::step][: args.prompts]]
    n = args.gen_tokens
    reps = args.repeats
    runs = [
        best_of(reps, lambda: plain(edge, prompts, n, args.seed, "edge-only")),
        best_of(reps, lambda: plain(device, prompts, n, args.seed, "device-only")),
    ]
    for k in range(1, args.k_max + 1):
        runs.append(best_of(reps, partial(run_speculative, device, edge, prompts, n, args.seed, f"spec k={k}", k)))
    for label, ratio in (("in-process", "cost_ratio_in_process"), (f"{args.rtt_ms:g} ms RTT", "cost_ratio_with_rtt")):
        mode = f"spec adaptive ({label})"

        def adaptive(mode: str = mode, ratio: str = ratio) -> GenStats:
            policy = spec.AdaptiveK(costs[ratio], 1, args.k_max)
            return run_speculative(device, edge, prompts, n, args.seed, mode, policy)

        runs.append(best_of(reps, adaptive))
    edge_device_logprob = device_text_edge_logprob(device, edge, prompts, n, args.seed)
    rows = [r.as_dict(rtt_s) for r in runs]
    rows[1]["edge_mean_logprob"] = edge_device_logprob
    return {
        "prompts": len(prompts),
        "tokens_per_prompt": n,
        "timing": f"fastest of {reps} identical seeded runs",
        "prompt_chars": args.prompt_chars,
        "seed": args.seed,
        "temperature": 1.0,
        "rtt_ms_modelled": args.rtt_ms,
        "costs": costs,
        "adaptive_rule": (
            "k = argmax over 1..k_max of E[tokens per block] / block cost = ((1 - a^(k+1)) / (1 - a)) / (1 + k * c), "
            "a = acceptance estimate from exponentially decayed counts (decay 0.9 per block, prior 0.6 worth 4 trials), "
            "c = (draft step + edge per-row cost) / (edge fixed call cost [+ RTT])"
        ),
        "runs": rows,
        "distribution_check": distribution_check(device, edge, evaluation, args.check_draws, args.seed),
    }


def device_text_edge_logprob(device: CharLM, edge: CharLM, prompts: list[list[int]], n: int, seed: int) -> float:
    """Mean edge log-probability of device-only samples (regenerated with the same seed, scored in batch)."""
    rng = np.random.default_rng(seed)
    rows: list[list[int]] = []
    toks: list[int] = []
    for prompt in prompts:
        ids = list(prompt)
        for _ in range(n):
            p = normalise(device.run(np.asarray([window(ids, device.context)], dtype=np.int64))[0])
            tok = spec.sample(p, rng)
            rows.append(window(ids, edge.context))
            toks.append(tok)
            ids.append(tok)
    ps = normalise(edge.run_batched(np.asarray(rows, dtype=np.int64), batch=256))
    return float(np.log(ps[np.arange(len(toks)), toks]).mean())


# --- output -----------------------------------------------------------------

COLOURS = {"max_prob": "#1f77b4", "margin": "#ff7f0e", "neg_entropy": "#2ca02c", "calibrated": "#d62728"}


def svg_plot(report: dict[str, Any], title: str) -> str:
    """Accuracy against share of tokens local, one line per signal, as a standalone SVG."""
    w, h, left, right, top, bottom = 720, 460, 70, 170, 40, 55
    dev, edge = float(report["device_accuracy"]), float(report["edge_accuracy"])
    y_lo = math.floor((dev - 0.01) * 50) / 50
    y_hi = math.ceil((edge + 0.005) * 50) / 50

    def sx(x: float) -> float:
        return left + x * (w - left - right)

    def sy(y: float) -> float:
        return top + (y_hi - y) / (y_hi - y_lo) * (h - top - bottom)

    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12">',
        f'<rect width="{w}" height="{h}" fill="white"/>',
        f'<text x="{w / 2 - 60}" y="22" text-anchor="middle" font-size="14">{title}</text>',
    ]
    for i in range(11):
        x = i / 10
        parts.append(f'<line x1="{sx(x):.1f}" y1="{top}" x2="{sx(x):.1f}" y2="{h - bottom}" stroke="#eee"/>')
        parts.append(f'<text x="{sx(x):.1f}" y="{h - bottom + 16}" text-anchor="middle">{x:.0%}</text>')
    y = y_lo
    while y <= y_hi + 1e-9:
        parts.append(f'<line x1="{left}" y1="{sy(y):.1f}" x2="{w - right}" y2="{sy(y):.1f}" stroke="#eee"/>')
        parts.append(f'<text x="{left - 6}" y="{sy(y) + 4:.1f}" text-anchor="end">{y:.0%}</text>')
        y += 0.01
    goal = dev + MIN_GAIN * (edge - dev)
    for value, label, dash, dy in (
        (edge, "edge alone", "", -4),
        (dev, "device alone", "", 14),
        (goal, "95 % of the edge's gain", "4,3", 14),
    ):
        parts.append(
            f'<line x1="{left}" y1="{sy(value):.1f}" x2="{w - right}" y2="{sy(value):.1f}" stroke="#555" '
            f'stroke-dasharray="{dash}"/><text x="{w - right - 4}" y="{sy(value) + dy:.1f}" fill="#555" '
            f'text-anchor="end">{label}</text>'
        )
    parts.append(
        f'<line x1="{sx(LOCAL_GOAL):.1f}" y1="{top}" x2="{sx(LOCAL_GOAL):.1f}" y2="{h - bottom}" '
        'stroke="#555" stroke-dasharray="2,3"/>'
    )
    for j, name in enumerate(SIGNAL_NAMES):
        curve: conf.CascadeCurve = report["signals"][name]["_curve"]
        keep = np.unique(np.linspace(0, len(curve.local_share) - 1, 400).round().astype(int))
        pts = " ".join(f"{sx(float(curve.local_share[i])):.1f},{sy(float(curve.accuracy[i])):.1f}" for i in keep)
        pts = f"{sx(0):.1f},{sy(report['edge_accuracy']):.1f} " + pts
        parts.append(f'<polyline points="{pts}" fill="none" stroke="{COLOURS[name]}" stroke-width="1.6"/>')
        ly = top + 90 + 18 * j
        parts.append(
            f'<line x1="{w - right + 8}" y1="{ly}" x2="{w - right + 28}" y2="{ly}" stroke="{COLOURS[name]}" stroke-width="2"/>'
        )
        parts.append(f'<text x="{w - right + 32}" y="{ly + 4}">{name}</text>')
    parts.append(
        f'<text x="{sx(0.5):.1f}" y="{h - 12}" text-anchor="middle">share of tokens served by the device</text>'
    )
    parts.append(
        f'<text x="16" y="{sy((y_lo + y_hi) / 2):.1f}" text-anchor="middle" '
        f'transform="rotate(-90 16 {sy((y_lo + y_hi) / 2):.1f})">next-character accuracy</text>'
    )
    parts.append("</svg>")
    return "\n".join(parts) + "\n"


def print_cascade(console: Console, rep: dict[str, Any]) -> None:
    """The cascade tables."""
    console.print(
        f"[bold]Held-out evaluation split[/]: {rep['positions']:,} positions — device {rep['device_accuracy']:.2%}, "
        f"edge {rep['edge_accuracy']:.2%} (gain {100 * (rep['edge_accuracy'] - rep['device_accuracy']):.2f} points), "
        f"either right {rep['oracle_accuracy']:.2%}. Calibration split: {rep['calibration_positions']:,} positions "
        f"of other documents (device {rep['calibration_device_accuracy']:.2%}, edge {rep['calibration_edge_accuracy']:.2%})."
    )
    cal = rep["calibrated_score"]
    console.print(
        "Calibrated score = sigmoid("
        + " + ".join(f"{w:.3f}·{f}" for f, w in zip(cal["features"], cal["weights"], strict=True))
        + f" + {cal['bias']:.3f})"
    )
    t = Table(title="Cascade: most local point recovering ≥ 95 % of the edge's gain (evaluation split)")
    for col in ("signal", "AUROC (device right)", "best local share", "threshold", "≥ 50 % local?"):
        t.add_column(col, justify="right")
    for share in SHARES:
        t.add_column(f"gain @ {share:.0%} local", justify="right")
    t.add_column("thr. from calib. split → local / gain", justify="right")
    for name in SIGNAL_NAMES:
        s = rep["signals"][name]
        tr = s["threshold_chosen_on_calibration"]
        t.add_row(
            name,
            f"{s['auroc_device_correct']:.4f}",
            "—" if s["best_local_share_at_95"] is None else f"{s['best_local_share_at_95']:.1%}",
            "—" if s["best_threshold_at_95"] is None else f"{s['best_threshold_at_95']:.3f}",
            "yes" if s["reaches_50_local"] else "no",
            *(f"{s['gain_at_local_share'][f'{share:.1f}']:.1%}" for share in SHARES),
            "—" if tr is None else f"{tr['threshold']:.3f} → {tr['local_share']:.1%} / {tr['gain_recovered']:.1%}",
        )
    console.print(t)
    t = Table(title="Threshold sweep (evaluation split): local share / gain recovered")
    t.add_column("threshold", justify="right")
    for name in SIGNAL_NAMES:
        t.add_column(name, justify="right")
    dev, edge = rep["device_accuracy"], rep["edge_accuracy"]
    for i, thr in enumerate(GRID):
        if not 0.3 <= thr <= 0.9 or round(thr * 100) % 10:
            continue
        cells = []
        for name in SIGNAL_NAMES:
            sw = rep["signals"][name]["sweep"]
            gain = float(conf.gain_recovered(sw["accuracy"][i], dev, edge))
            cells.append(f"{sw['local_share'][i]:.1%} / {gain:.0%}")
        t.add_row(f"{thr:.2f}", *cells)
    console.print(t)


def print_speculative(console: Console, rep: dict[str, Any]) -> None:
    """The speculative decoding tables."""
    c = rep["costs"]
    console.print(
        f"[bold]Generation[/]: {rep['prompts']} prompts × {rep['tokens_per_prompt']} tokens, temperature 1, seed {rep['seed']}, "
        f"one onnxruntime thread. Device step {1e3 * c['device_step_s']:.3f} ms, edge call b1 {1e3 * c['edge_call_b1_s']:.3f} ms, "
        f"b9 {1e3 * c['edge_call_b9_s']:.3f} ms."
    )
    t = Table(title=f"Speculative decoding (modelled column adds {rep['rtt_ms_modelled']:g} ms per edge call)")
    cols = (
        "mode", "acceptance", "draft share", "tokens / edge call", "edge calls / token", "edge rows / token",
        "mean k", "tokens/s (in-process)", "tokens/s (modelled RTT)", "edge mean log p",
    )  # fmt: skip
    for col in cols:
        t.add_column(col, justify="right")

    def f(v: float | None, fmt: str) -> str:
        return "—" if v is None else format(v, fmt)

    for r in rep["runs"]:
        t.add_row(
            r["mode"],
            f(r["acceptance_rate"], ".1%"),
            f(r["draft_share"], ".1%"),
            f(r["tokens_per_edge_call"], ".2f"),
            f(r["edge_calls_per_token"], ".3f"),
            f(r["edge_rows_per_token"], ".2f"),
            f(r["mean_k"], ".2f"),
            f(r["tokens_per_s"], ",.0f"),
            f(r["modelled_tokens_per_s"], ",.0f"),
            f(r["edge_mean_logprob"], ".3f"),
        )
    console.print(t)
    t = Table(title="Does speculative output follow p_edge? single tokens drawn through the rule at fixed contexts")
    for col in ("context", "draws", "TV(q_dev, p_edge)", "TV(spec, p_edge)", "99 % bound", "chi² / dof", "p-value"):
        t.add_column(col, justify="right")
    for d in rep["distribution_check"]:
        t.add_row(
            repr(d["context_text"][-24:]),
            f"{d['draws']:,}",
            f"{d['tv_device_vs_edge']:.3f}",
            f"{d['tv_speculative_vs_edge']:.4f}",
            f"{d['tv_bound_99']:.4f}",
            f"{d['chi2']:.1f} / {d['dof']}",
            f"{d['chi2_p_value']:.2f}",
        )
    console.print(t)


def main(argv: list[str] | None = None) -> int:
    """Entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--positions", type=int, default=20_000, help="evaluation positions (default 20000)")
    parser.add_argument(
        "--calibration-positions", type=int, default=10_000, help="calibration positions (default 10000)"
    )
    parser.add_argument("--variant", choices=("int8", "fp32"), default="int8")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output directory")
    parser.add_argument("--prompts", type=int, default=8, help="generation prompts (default 8)")
    parser.add_argument("--prompt-chars", type=int, default=32, help="characters of each prompt (default 32)")
    parser.add_argument("--gen-tokens", type=int, default=256, help="tokens generated per prompt (default 256)")
    parser.add_argument("--k-max", type=int, default=8, help="largest draft length (default 8)")
    parser.add_argument("--rtt-ms", type=float, default=2.0, help="modelled round trip per edge call (default 2)")
    parser.add_argument("--check-draws", type=int, default=20_000, help="draws per context in the distribution check")
    parser.add_argument("--repeats", type=int, default=3, help="timed repetitions per generation mode; fastest kept")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-speculative", action="store_true", help="only the cascade")
    args = parser.parse_args(argv)
    console = Console(highlight=False, width=200)
    suffix = ".int8.onnx" if args.variant == "int8" else ".onnx"
    device_path, edge_path = MODELS_DIR / f"charlm-device{suffix}", MODELS_DIR / f"charlm-edge{suffix}"
    device, edge = CharLM.load(device_path, 2), CharLM.load(edge_path, 2)
    if device.tokenizer.vocab != edge.tokenizer.vocab:
        raise SystemExit("the device and edge models have different vocabularies")
    t0 = time.perf_counter()
    evaluation_docs, calibration_docs = split_docs(build_corpus().heldout_docs)
    evaluation = score(device, edge, evaluation_docs, args.positions)
    calibration = score(device, edge, calibration_docs, args.calibration_positions)
    scoring_s = time.perf_counter() - t0
    console.print(
        f"Scored {args.positions + args.calibration_positions:,} positions with both models in {scoring_s:.1f} s."
    )
    cascade = cascade_report(evaluation, calibration)
    print_cascade(console, cascade)
    summary: dict[str, Any] = {
        "variant": args.variant,
        "models": [device_path.name, edge_path.name],
        "heldout_documents": {"evaluation": len(evaluation_docs), "calibration": len(calibration_docs)},
        "split": "held-out documents with sha256(text)[0] % 4 == 0 calibrate, the rest evaluate; no document in both",
        "scoring_seconds": scoring_s,
        "python": platform.python_version(),
        "onnxruntime": ort.__version__,
        "numpy": np.__version__,
        "cascade": cascade,
    }
    if not args.no_speculative:
        summary["speculative"] = speculative_report(device_path, edge_path, evaluation_docs, evaluation, args)
        print_speculative(console, summary["speculative"])
    args.out.mkdir(parents=True, exist_ok=True)
    svg = svg_plot(cascade, f"Token-level cascade, {args.variant} demo models, {args.positions:,} held-out positions")
    (args.out / f"cascade-{args.variant}.svg").write_text(svg)
    for s in cascade["signals"].values():
        del s["_curve"]
    (args.out / f"summary-{args.variant}.json").write_text(json.dumps(summary, indent=1, default=float) + "\n")
    console.print(f"Wrote {args.out / f'summary-{args.variant}.json'} and {args.out / f'cascade-{args.variant}.svg'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
