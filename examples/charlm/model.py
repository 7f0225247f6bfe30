"""Numpy character language models: training and ONNX export.

Two architectures share one training loop:

* :class:`CharMLP` -- the "neural probabilistic language model" shape: embed
  the last ``context`` characters, concatenate, tanh hidden layer(s), linear
  output. Cheap and fast; used for the device model.
* :class:`CharTransformer` -- a small pre-LayerNorm causal transformer, used
  for the edge model. On a development split carved from the training
  modules, flat MLPs with 6x the device model's parameters (context 24-32,
  one or two wide tanh layers) gained less than half a point over it, while
  this transformer at the same parameter count gained about five: docstrings
  repeat identifiers and phrases from earlier in the same text, and attending
  to (copying from) a longer context is what attention is good at.

Both are trained with hand-written backward passes (the heavy lifting is in
BLAS matmuls) and exported with :mod:`onnx.helper` to standard opset-17 ops,
with weight matmuls as plain ``MatMul`` nodes so dynamic int8 quantisation can
pick them up.
"""

from __future__ import annotations

import itertools
import json
import math
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import onnx
from onnx import NodeProto, TensorProto, helper, numpy_helper

from examples.charlm.corpus import PAD_ID, TokenStream

OPSET = 17
IR_VERSION = 9
# PAD is never a target; a fixed, very negative logit keeps its probability at
# ~1e-13 without spending any training signal on it.
PAD_LOGIT = -30.0
LN_EPS = 1e-5
# Large negative instead of -inf so masked scores never produce NaN.
MASK_VALUE = -1e9


@dataclass(frozen=True)
class ModelConfig:
    """Architecture and training hyper-parameters of one char-LM.

    Attributes:
        name: Model name written to the ONNX metadata.
        arch: ``"mlp"`` or ``"transformer"``.
        context: Number of previous characters the model sees.
        embed: Embedding width (``d_model`` for the transformer).
        hidden: MLP: width of each tanh layer. Transformer: feed-forward
            width of each block (one entry per block).
        heads: Attention heads (transformer only).
        batch: Minibatch size in windows (MLP) or sequences (transformer).
        epochs: Passes over the training characters (may be fractional).
        lr: Peak AdamW learning rate.
        weight_decay: Decoupled weight decay on matrices.
        dropout: Dropout on hidden activations (MLP) or on residual branches
            (transformer) during training.
        seed: Seed for initialisation, shuffling and dropout.
    """

    name: str
    arch: str
    context: int
    embed: int
    hidden: tuple[int, ...]
    heads: int = 1
    batch: int = 512
    epochs: float = 4.0
    lr: float = 3e-3
    weight_decay: float = 0.0
    dropout: float = 0.0
    seed: int = 0

    def describe(self) -> str:
        """Return a compact human readable architecture string."""
        if self.arch == "mlp":
            layers = ", ".join(str(h) for h in self.hidden)
            return f"MLP: context {self.context}, embedding {self.embed}, tanh hidden [{layers}]"
        return (
            f"causal transformer: context {self.context}, {len(self.hidden)} pre-LN blocks, "
            f"d_model {self.embed}, {self.heads} heads, ReLU FFN {self.hidden[0]}"
        )

    def to_dict(self) -> dict[str, object]:
        """Return the configuration as JSON-serialisable data."""
        data = asdict(self)
        data["hidden"] = list(self.hidden)
        return data


def _softmax_last(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=-1, keepdims=True)
    np.exp(z, out=z)
    z /= z.sum(axis=-1, keepdims=True)
    return z


def _embedding_grad(ids: np.ndarray, grad: np.ndarray, vocab_size: int) -> np.ndarray:
    # Scatter-add through a one-hot matmul: with a vocabulary this small BLAS
    # is much faster than np.add.at.
    flat = ids.reshape(-1)
    onehot = np.zeros((flat.size, vocab_size), dtype=np.float32)
    onehot[np.arange(flat.size), flat] = 1.0
    out: np.ndarray = onehot.T @ grad.reshape(flat.size, -1)
    return out


def _dropout_mask(shape: tuple[int, ...], rate: float, rng: np.random.Generator) -> np.ndarray:
    # Random bytes are ~10x cheaper than random floats and a rate quantised
    # to 1/256 is plenty; the scale uses the exact keep probability.
    drop = round(rate * 256)
    raw = np.frombuffer(rng.bytes(math.prod(shape)), dtype=np.uint8).reshape(shape)
    return (raw >= drop).astype(np.float32) * np.float32(256.0 / (256 - drop))


class CharModel(ABC):
    """Interface the training loop and the exporter rely on."""

    context: int
    vocab_size: int

    @abstractmethod
    def params(self) -> list[np.ndarray]:
        """Return all parameter arrays in a fixed order."""

    @abstractmethod
    def decayed(self) -> list[bool]:
        """Return, per :meth:`params` entry, whether weight decay applies."""

    @abstractmethod
    def batch(self, stream: TokenStream, ends: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Build one training batch whose last target is at each of ``ends``."""

    @abstractmethod
    def loss_and_grads(
        self, x: np.ndarray, y: np.ndarray, dropout: float, rng: np.random.Generator
    ) -> tuple[float, list[np.ndarray]]:
        """Mean cross-entropy (nats) and gradients in :meth:`params` order."""

    @abstractmethod
    def logits(self, x: np.ndarray) -> np.ndarray:
        """Next-character logits ``[B, V]`` for full windows ``[B, C]``."""

    @abstractmethod
    def onnx_graph(self) -> tuple[list[NodeProto], list[TensorProto]]:
        """Nodes and initialisers mapping ``input_ids`` to ``probs``."""

    def tokens_per_batch(self, batch: int) -> int:
        """Training targets contributed by one minibatch of ``batch`` items."""
        return batch

    def num_params(self) -> int:
        """Return the total number of scalar parameters."""
        return sum(int(p.size) for p in self.params())

    def predict(self, x: np.ndarray, batch: int = 2048) -> np.ndarray:
        """Return the argmax next character for each window ``[N, C]``."""
        preds = [self.logits(x[i : i + batch]).argmax(axis=1) for i in range(0, len(x), batch)]
        return np.concatenate(preds) if preds else np.zeros(0, dtype=np.int64)


class CharMLP(CharModel):
    """Concatenated-embedding tanh MLP.

    Args:
        cfg: Model configuration (``arch == "mlp"``).
        vocab_size: Number of ids including PAD and UNK.
        rng: Seeded generator for the initialisation.
    """

    def __init__(self, cfg: ModelConfig, vocab_size: int, rng: np.random.Generator) -> None:
        self.context = cfg.context
        self.vocab_size = vocab_size
        self.emb = rng.normal(0.0, 1.0, (vocab_size, cfg.embed)).astype(np.float32)
        dims = [cfg.context * cfg.embed, *cfg.hidden, vocab_size]
        self.weights: list[np.ndarray] = []
        self.biases: list[np.ndarray] = []
        for i, (fan_in, fan_out) in enumerate(itertools.pairwise(dims)):
            # Small output layer so the initial distribution is near uniform;
            # 1/sqrt(fan_in) keeps tanh units out of saturation at the start.
            scale = (0.1 if i == len(dims) - 2 else 1.0) / math.sqrt(fan_in)
            self.weights.append(rng.normal(0.0, scale, (fan_in, fan_out)).astype(np.float32))
            self.biases.append(np.zeros(fan_out, dtype=np.float32))
        self.weights[-1][:, PAD_ID] = 0.0
        self.biases[-1][PAD_ID] = PAD_LOGIT

    def params(self) -> list[np.ndarray]:
        return [self.emb, *self.weights, *self.biases]

    def decayed(self) -> list[bool]:
        return [False] + [True] * len(self.weights) + [False] * len(self.biases)

    def batch(self, stream: TokenStream, ends: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return stream.windows(ends)

    def logits(self, x: np.ndarray) -> np.ndarray:
        h = self.emb[x].reshape(x.shape[0], -1)
        for w, b in zip(self.weights[:-1], self.biases[:-1], strict=True):
            h = np.tanh(h @ w + b)
        out: np.ndarray = h @ self.weights[-1] + self.biases[-1]
        return out

    def loss_and_grads(
        self, x: np.ndarray, y: np.ndarray, dropout: float, rng: np.random.Generator
    ) -> tuple[float, list[np.ndarray]]:
        n = x.shape[0]
        acts = [self.emb[x].reshape(n, -1)]
        tanhs: list[np.ndarray] = []
        masks: list[np.ndarray | None] = []
        for w, b in zip(self.weights[:-1], self.biases[:-1], strict=True):
            t = np.tanh(acts[-1] @ w + b)
            tanhs.append(t)
            mask = _dropout_mask(t.shape, dropout, rng) if dropout > 0.0 else None
            masks.append(mask)
            acts.append(t * mask if mask is not None else t)
        probs = _softmax_last(acts[-1] @ self.weights[-1] + self.biases[-1])
        rows = np.arange(n)
        loss = float(-np.log(probs[rows, y] + 1e-12).mean())

        grad = probs
        grad[rows, y] -= 1.0
        grad /= n
        n_w = len(self.weights)
        gw: list[np.ndarray] = [np.empty(0)] * n_w
        gb: list[np.ndarray] = [np.empty(0)] * n_w
        for i in range(n_w - 1, -1, -1):
            gw[i] = acts[i].T @ grad
            gb[i] = grad.sum(axis=0)
            grad = grad @ self.weights[i].T
            if i == 0:
                break
            mask_i = masks[i - 1]
            if mask_i is not None:
                grad *= mask_i
            grad *= 1.0 - tanhs[i - 1] * tanhs[i - 1]
        gw[-1][:, PAD_ID] = 0.0
        gb[-1][PAD_ID] = 0.0
        g_emb = _embedding_grad(x, grad, self.vocab_size)
        return loss, [g_emb, *gw, *gb]

    def onnx_graph(self) -> tuple[list[NodeProto], list[TensorProto]]:
        c, e = self.context, self.emb.shape[1]
        inits = [
            numpy_helper.from_array(self.emb, "embedding"),
            numpy_helper.from_array(np.array([-1, c * e], dtype=np.int64), "flat_shape"),
        ]
        nodes = [
            helper.make_node("Gather", ["embedding", "input_ids"], ["embedded"], "embed", axis=0),
            helper.make_node("Reshape", ["embedded", "flat_shape"], ["h0"], "flatten"),
        ]
        h = "h0"
        last = len(self.weights) - 1
        for i, (w, b) in enumerate(zip(self.weights, self.biases, strict=True)):
            inits += [numpy_helper.from_array(w, f"w{i}"), numpy_helper.from_array(b, f"b{i}")]
            out = "logits" if i == last else f"z{i}"
            nodes.append(helper.make_node("MatMul", [h, f"w{i}"], [f"mm{i}"], f"matmul{i}"))
            nodes.append(helper.make_node("Add", [f"mm{i}", f"b{i}"], [out], f"bias{i}"))
            if i != last:
                nodes.append(helper.make_node("Tanh", [out], [f"h{i + 1}"], f"tanh{i}"))
                h = f"h{i + 1}"
        nodes.append(helper.make_node("Softmax", ["logits"], ["probs"], "softmax", axis=-1))
        return nodes, inits


def _layer_norm(x: np.ndarray, gain: np.ndarray, bias: np.ndarray) -> tuple[np.ndarray, tuple[np.ndarray, np.ndarray]]:
    mu = x.mean(axis=-1, keepdims=True)
    xc = x - mu
    rstd = 1.0 / np.sqrt((xc * xc).mean(axis=-1, keepdims=True) + LN_EPS)
    xhat = xc * rstd
    return xhat * gain + bias, (xhat, rstd)


def _layer_norm_back(
    dy: np.ndarray, gain: np.ndarray, cache: tuple[np.ndarray, np.ndarray]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    xhat, rstd = cache
    dg = (dy * xhat).sum(axis=0)
    db = dy.sum(axis=0)
    dxh = dy * gain
    dx = rstd * (dxh - dxh.mean(axis=-1, keepdims=True) - xhat * (dxh * xhat).mean(axis=-1, keepdims=True))
    return dx, dg, db


# Per-block parameter names, in the order they appear in params().
_BLOCK_KEYS = ("ln1_g", "ln1_b", "wqkv", "bqkv", "wo", "bo", "ln2_g", "ln2_b", "w1", "b1", "w2", "b2")
_BLOCK_DECAY = {"wqkv", "wo", "w1", "w2"}


@dataclass
class _BlockCache:
    """Activations of one transformer block kept for the backward pass."""

    a: np.ndarray
    ln1: tuple[np.ndarray, np.ndarray]
    o: np.ndarray
    q: np.ndarray
    k: np.ndarray
    v: np.ndarray
    p: np.ndarray
    m1: np.ndarray | None
    m: np.ndarray
    ln2: tuple[np.ndarray, np.ndarray]
    u: np.ndarray
    r: np.ndarray
    m2: np.ndarray | None


class CharTransformer(CharModel):
    """Small pre-LayerNorm causal transformer with learned positions.

    Trained on every position of each sequence (a causal mask keeps it
    honest), but only the last position's prediction is exported, since the
    ONNX contract returns one distribution per window.

    Args:
        cfg: Model configuration (``arch == "transformer"``).
        vocab_size: Number of ids including PAD and UNK.
        rng: Seeded generator for the initialisation.
    """

    def __init__(self, cfg: ModelConfig, vocab_size: int, rng: np.random.Generator) -> None:
        if cfg.embed % cfg.heads:
            raise ValueError("embed must be divisible by heads")
        self.context = cfg.context
        self.vocab_size = vocab_size
        self.heads = cfg.heads
        d = cfg.embed
        n_blocks = len(cfg.hidden)

        def normal(std: float, *shape: int) -> np.ndarray:
            return rng.normal(0.0, std, shape).astype(np.float32)

        self.tok = normal(0.1, vocab_size, d)
        self.pos = normal(0.1, cfg.context, d)
        self.blocks: list[dict[str, np.ndarray]] = []
        # Residual-branch outputs are scaled down with depth (GPT-2 style) so
        # the residual stream does not grow with the number of blocks.
        res_scale = 1.0 / math.sqrt(2 * n_blocks)
        for ffn in cfg.hidden:
            self.blocks.append(
                {
                    "ln1_g": np.ones(d, np.float32),
                    "ln1_b": np.zeros(d, np.float32),
                    "wqkv": normal(1.0 / math.sqrt(d), d, 3 * d),
                    "bqkv": np.zeros(3 * d, np.float32),
                    "wo": normal(res_scale / math.sqrt(d), d, d),
                    "bo": np.zeros(d, np.float32),
                    "ln2_g": np.ones(d, np.float32),
                    "ln2_b": np.zeros(d, np.float32),
                    "w1": normal(1.0 / math.sqrt(d), d, ffn),
                    "b1": np.zeros(ffn, np.float32),
                    "w2": normal(res_scale / math.sqrt(ffn), ffn, d),
                    "b2": np.zeros(d, np.float32),
                }
            )
        self.lnf_g = np.ones(d, np.float32)
        self.lnf_b = np.zeros(d, np.float32)
        self.w_out = normal(0.02, d, vocab_size)
        self.w_out[:, PAD_ID] = 0.0
        self.b_out = np.zeros(vocab_size, np.float32)
        self.b_out[PAD_ID] = PAD_LOGIT
        self.mask = np.triu(np.full((cfg.context, cfg.context), MASK_VALUE, np.float32), k=1)

    def params(self) -> list[np.ndarray]:
        out = [self.tok, self.pos]
        for blk in self.blocks:
            out += [blk[k] for k in _BLOCK_KEYS]
        return [*out, self.lnf_g, self.lnf_b, self.w_out, self.b_out]

    def decayed(self) -> list[bool]:
        flags = [False, False]
        for _ in self.blocks:
            flags += [k in _BLOCK_DECAY for k in _BLOCK_KEYS]
        return [*flags, False, False, True, False]

    def tokens_per_batch(self, batch: int) -> int:
        return batch * self.context

    def batch(self, stream: TokenStream, ends: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        # Sequence i predicts ids[e-C+1 .. e] from ids[e-C .. e-1]; targets
        # that fall on PAD separators are masked out in the loss.
        offsets = np.arange(-self.context, 0, dtype=np.int64)
        x = stream.ids[ends[:, None] + offsets].astype(np.int64)
        y = stream.ids[ends[:, None] + offsets + 1].astype(np.int64)
        return x, y

    def _attention(
        self, a: np.ndarray, blk: dict[str, np.ndarray], b: int, t: int
    ) -> tuple[np.ndarray, tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]:
        d = a.shape[-1]
        hd = d // self.heads
        qkv = a @ blk["wqkv"] + blk["bqkv"]
        qkv = qkv.reshape(b, t, 3, self.heads, hd).transpose(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        scale = np.float32(1.0 / math.sqrt(hd))
        p = _softmax_last((q @ k.transpose(0, 1, 3, 2)) * scale + self.mask)
        o = (p @ v).transpose(0, 2, 1, 3).reshape(b * t, d)
        return o, (q, k, v, p)

    def _forward(
        self, x: np.ndarray, dropout: float, rng: np.random.Generator | None
    ) -> tuple[np.ndarray, list[_BlockCache]]:
        b, t = x.shape
        h = (self.tok[x] + self.pos[None, :t]).reshape(b * t, -1)
        caches: list[_BlockCache] = []
        for blk in self.blocks:
            a, ln1 = _layer_norm(h, blk["ln1_g"], blk["ln1_b"])
            o, att = self._attention(a, blk, b, t)
            branch = o @ blk["wo"] + blk["bo"]
            m1 = _dropout_mask(branch.shape, dropout, rng) if dropout > 0 and rng is not None else None
            h1 = h + (branch * m1 if m1 is not None else branch)
            m, ln2 = _layer_norm(h1, blk["ln2_g"], blk["ln2_b"])
            u = m @ blk["w1"] + blk["b1"]
            r = np.maximum(u, 0.0)
            ff = r @ blk["w2"] + blk["b2"]
            m2 = _dropout_mask(ff.shape, dropout, rng) if dropout > 0 and rng is not None else None
            h = h1 + (ff * m2 if m2 is not None else ff)
            caches.append(_BlockCache(a, ln1, o, *att, m1, m, ln2, u, r, m2))
        return h, caches

    def logits(self, x: np.ndarray) -> np.ndarray:
        b, t = x.shape
        h, _ = self._forward(x, 0.0, None)
        last = h.reshape(b, t, -1)[:, -1]
        hf, _ = _layer_norm(last, self.lnf_g, self.lnf_b)
        out: np.ndarray = hf @ self.w_out + self.b_out
        return out

    def loss_and_grads(
        self, x: np.ndarray, y: np.ndarray, dropout: float, rng: np.random.Generator
    ) -> tuple[float, list[np.ndarray]]:
        b, t = x.shape
        d = self.tok.shape[1]
        h, caches = self._forward(x, dropout, rng)
        hf, lnf = _layer_norm(h, self.lnf_g, self.lnf_b)
        probs = _softmax_last(hf @ self.w_out + self.b_out)
        yf = y.reshape(-1)
        valid = (yf != PAD_ID).astype(np.float32)
        count = max(1.0, float(valid.sum()))
        rows = np.arange(yf.size)
        loss = float(-(np.log(probs[rows, yf] + 1e-12) * valid).sum() / count)

        g = probs
        g[rows, yf] -= 1.0
        g *= (valid / count)[:, None]
        g_wout = hf.T @ g
        g_bout = g.sum(axis=0)
        g_wout[:, PAD_ID] = 0.0
        g_bout[PAD_ID] = 0.0
        dh, g_lnf_g, g_lnf_b = _layer_norm_back(g @ self.w_out.T, self.lnf_g, lnf)

        block_grads: list[list[np.ndarray]] = []
        for blk, cache in zip(reversed(self.blocks), reversed(caches), strict=True):
            dh, grads = self._block_backward(dh, blk, cache, b, t)
            block_grads.append(grads)

        g_tok = _embedding_grad(x, dh, self.vocab_size)
        g_pos = dh.reshape(b, t, d).sum(axis=0)
        out = [g_tok, g_pos]
        for grads in reversed(block_grads):
            out += grads
        return loss, [*out, g_lnf_g, g_lnf_b, g_wout, g_bout]

    def _block_backward(
        self, dh: np.ndarray, blk: dict[str, np.ndarray], cache: _BlockCache, b: int, t: int
    ) -> tuple[np.ndarray, list[np.ndarray]]:
        d = dh.shape[-1]
        hd = d // self.heads
        gr: dict[str, np.ndarray] = {}
        dff = dh * cache.m2 if cache.m2 is not None else dh
        gr["w2"] = cache.r.T @ dff
        gr["b2"] = dff.sum(axis=0)
        du = (dff @ blk["w2"].T) * (cache.u > 0)
        gr["w1"] = cache.m.T @ du
        gr["b1"] = du.sum(axis=0)
        dx, gr["ln2_g"], gr["ln2_b"] = _layer_norm_back(du @ blk["w1"].T, blk["ln2_g"], cache.ln2)
        dh1 = dh + dx

        dbr = dh1 * cache.m1 if cache.m1 is not None else dh1
        gr["wo"] = cache.o.T @ dbr
        gr["bo"] = dbr.sum(axis=0)
        do = (dbr @ blk["wo"].T).reshape(b, t, self.heads, hd).transpose(0, 2, 1, 3)
        q, k, v, p = cache.q, cache.k, cache.v, cache.p
        dv = p.transpose(0, 1, 3, 2) @ do
        dp = do @ v.transpose(0, 1, 3, 2)
        # Softmax backward; masked entries have p == 0 and so get no gradient.
        ds = p * (dp - (dp * p).sum(axis=-1, keepdims=True)) * np.float32(1.0 / math.sqrt(hd))
        dq = ds @ k
        dk = ds.transpose(0, 1, 3, 2) @ q
        dqkv = np.stack([dq, dk, dv]).transpose(1, 3, 0, 2, 4).reshape(b * t, 3 * d)
        gr["wqkv"] = cache.a.T @ dqkv
        gr["bqkv"] = dqkv.sum(axis=0)
        dx, gr["ln1_g"], gr["ln1_b"] = _layer_norm_back(dqkv @ blk["wqkv"].T, blk["ln1_g"], cache.ln1)
        return dh1 + dx, [gr[k_] for k_ in _BLOCK_KEYS]

    def onnx_graph(self) -> tuple[list[NodeProto], list[TensorProto]]:
        c, d = self.context, self.tok.shape[1]
        g = _GraphBuilder()
        g.const("heads_shape", np.array([0, 0, self.heads, d // self.heads], np.int64))
        g.const("merge_shape", np.array([0, 0, d], np.int64))
        g.const("last_index", np.array([c - 1], np.int64))
        g.const("causal_mask", self.mask)
        emb = g.node("Gather", [g.const("tok_emb", self.tok), "input_ids"], "tok", axis=0)
        h = g.node("Add", [emb, g.const("pos_emb", self.pos)], "x0")
        for i, blk in enumerate(self.blocks):
            h = self._onnx_block(g, f"blk{i}_", blk, h, final=i == len(self.blocks) - 1)
        h = g.node("Reshape", [h, g.const("flat_shape", np.array([-1, d], np.int64))], "final_flat")
        hf = g.layer_norm(h, "lnf", self.lnf_g, self.lnf_b)
        mm = g.node("MatMul", [hf, g.const("w_out", self.w_out)], "out_mm")
        logits = g.node("Add", [mm, g.const("b_out", self.b_out)], "logits")
        g.node("Softmax", [logits], "probs", axis=-1)
        return g.nodes, g.inits

    def _onnx_block(self, g: _GraphBuilder, p: str, blk: dict[str, np.ndarray], h: str, final: bool) -> str:
        hd = self.tok.shape[1] // self.heads
        scale = np.float32(1.0 / math.sqrt(hd))
        ln1 = g.layer_norm(h, p + "ln1", blk["ln1_g"], blk["ln1_b"])
        # The 1/sqrt(head_dim) score scale is folded into the query weights.
        wq, wk, wv = np.split(blk["wqkv"], 3, axis=1)
        bq, bk, bv = np.split(blk["bqkv"], 3)
        # Only the last position's output is exported, so the final block
        # computes its query, attention and FFN for that position only.
        q_src = g.node("Gather", [ln1, "last_index"], p + "ln1_last", axis=1) if final else ln1
        resid = g.node("Gather", [h, "last_index"], p + "x_last", axis=1) if final else h
        proj = {}
        for name, src, w, bias in (("q", q_src, wq * scale, bq * scale), ("k", ln1, wk, bk), ("v", ln1, wv, bv)):
            z = g.linear(src, p + name, w, bias)
            split = g.node("Reshape", [z, "heads_shape"], p + name + "_heads")
            perm = [0, 2, 3, 1] if name == "k" else [0, 2, 1, 3]
            proj[name] = g.node("Transpose", [split], p + name + "_t", perm=perm)
        scores = g.node("MatMul", [proj["q"], proj["k"]], p + "scores")
        if not final:
            scores = g.node("Add", [scores, "causal_mask"], p + "scores_masked")
        attn = g.node("Softmax", [scores], p + "attn", axis=-1)
        ctx = g.node("MatMul", [attn, proj["v"]], p + "ctx")
        ctx = g.node("Transpose", [ctx], p + "ctx_t", perm=[0, 2, 1, 3])
        ctx = g.node("Reshape", [ctx, "merge_shape"], p + "ctx_merged")
        h1 = g.node("Add", [resid, g.linear(ctx, p + "o", blk["wo"], blk["bo"])], p + "res1")
        ln2 = g.layer_norm(h1, p + "ln2", blk["ln2_g"], blk["ln2_b"])
        r = g.node("Relu", [g.linear(ln2, p + "ff1", blk["w1"], blk["b1"])], p + "relu")
        return g.node("Add", [h1, g.linear(r, p + "ff2", blk["w2"], blk["b2"])], p + "res2")


class _GraphBuilder:
    """Accumulates ONNX nodes and initialisers; node names equal output names."""

    def __init__(self) -> None:
        self.nodes: list[NodeProto] = []
        self.inits: list[TensorProto] = []

    def const(self, name: str, value: np.ndarray) -> str:
        self.inits.append(numpy_helper.from_array(np.ascontiguousarray(value), name))
        return name

    def node(self, op: str, inputs: list[str], output: str, **attrs: Any) -> str:
        self.nodes.append(helper.make_node(op, inputs, [output], output, **attrs))
        return output

    def linear(self, x: str, name: str, w: np.ndarray, b: np.ndarray) -> str:
        mm = self.node("MatMul", [x, self.const(name + "_w", w)], name + "_mm")
        return self.node("Add", [mm, self.const(name + "_b", b)], name)

    def layer_norm(self, x: str, name: str, gain: np.ndarray, bias: np.ndarray) -> str:
        inputs = [x, self.const(name + "_g", gain), self.const(name + "_b", bias)]
        return self.node("LayerNormalization", inputs, name, axis=-1, epsilon=LN_EPS)


def build_model(cfg: ModelConfig, vocab_size: int, rng: np.random.Generator) -> CharModel:
    """Instantiate the architecture named by ``cfg.arch``.

    Args:
        cfg: Model configuration.
        vocab_size: Number of ids including PAD and UNK.
        rng: Seeded generator for the initialisation.

    Returns:
        A freshly initialised model.
    """
    if cfg.arch == "mlp":
        return CharMLP(cfg, vocab_size, rng)
    if cfg.arch == "transformer":
        return CharTransformer(cfg, vocab_size, rng)
    raise ValueError(f"unknown arch {cfg.arch!r}")


class AdamW:
    """Adam with decoupled weight decay, updating parameter arrays in place.

    Args:
        params: Parameter arrays (updated in place).
        decayed: Per parameter, whether weight decay applies.
        weight_decay: Decay rate, multiplied by the learning rate each step.
        betas: Adam moment decay rates.
        eps: Denominator epsilon.
    """

    def __init__(
        self,
        params: list[np.ndarray],
        decayed: list[bool],
        weight_decay: float,
        betas: tuple[float, float] = (0.9, 0.99),
        eps: float = 1e-8,
    ) -> None:
        self.params = params
        self.decayed = decayed
        self.weight_decay = weight_decay
        self.betas = betas
        self.eps = eps
        self.m1 = [np.zeros_like(p) for p in params]
        self.m2 = [np.zeros_like(p) for p in params]
        self.t = 0

    def step(self, grads: list[np.ndarray], lr: float) -> None:
        """Apply one update.

        Args:
            grads: Gradients in the order of ``params``.
            lr: Learning rate for this step.
        """
        self.t += 1
        b1, b2 = self.betas
        bc1 = 1.0 - b1**self.t
        bc2 = 1.0 - b2**self.t
        for i, g in enumerate(grads):
            p, m1, m2 = self.params[i], self.m1[i], self.m2[i]
            m1 *= b1
            m1 += (1.0 - b1) * g
            m2 *= b2
            m2 += (1.0 - b2) * (g * g)
            if self.decayed[i] and self.weight_decay:
                p *= 1.0 - lr * self.weight_decay
            p -= (lr / bc1) * m1 / (np.sqrt(m2 / bc2) + self.eps)


@dataclass
class TrainResult:
    """Outcome of :func:`train`.

    Attributes:
        model: Trained model.
        seconds: Wall-clock training time.
        cpu_seconds: Process CPU time spent training (all threads).
        steps: Optimiser steps taken.
        history: Progress records (step, loss, seconds, optional eval_acc).
    """

    model: CharModel
    seconds: float
    cpu_seconds: float
    steps: int
    history: list[dict[str, float]]


def train(
    cfg: ModelConfig,
    stream: TokenStream,
    vocab_size: int,
    evaluate: Callable[[CharModel], float] | None = None,
    log: Callable[[str], None] = print,
    eval_every: int = 2000,
) -> TrainResult:
    """Train a model with AdamW and a linear-warmup + cosine schedule.

    Args:
        cfg: Model and training configuration.
        stream: Training text (its context must equal ``cfg.context``).
        vocab_size: Number of ids.
        evaluate: Optional callback returning an accuracy, used for progress
            logs only (it never influences training).
        log: Sink for progress lines.
        eval_every: Steps between progress lines.

    Returns:
        The trained model and timing information.
    """
    if stream.context != cfg.context:
        raise ValueError(f"stream context {stream.context} != model context {cfg.context}")
    rng = np.random.default_rng(cfg.seed)
    model = build_model(cfg, vocab_size, rng)
    opt = AdamW(model.params(), model.decayed(), cfg.weight_decay)

    n_pos = len(stream.targets)
    steps_per_epoch = max(1, n_pos // model.tokens_per_batch(cfg.batch))
    total = max(1, int(cfg.epochs * steps_per_epoch))
    warmup = min(500, max(1, total // 20))
    history: list[dict[str, float]] = []
    t0, c0 = time.perf_counter(), time.process_time()
    order = rng.permutation(n_pos)
    cursor = 0
    running, since = 0.0, 0
    for step in range(1, total + 1):
        if cursor + cfg.batch > n_pos:
            order = rng.permutation(n_pos)
            cursor = 0
        ends = stream.targets[order[cursor : cursor + cfg.batch]]
        cursor += cfg.batch
        x, y = model.batch(stream, ends)
        loss, grads = model.loss_and_grads(x, y, cfg.dropout, rng)
        running += loss
        since += 1

        if step <= warmup:
            lr = cfg.lr * step / warmup
        else:
            frac = (step - warmup) / max(1, total - warmup)
            lr = cfg.lr * (0.02 + 0.98 * 0.5 * (1.0 + math.cos(math.pi * frac)))
        opt.step(grads, lr)

        if step % eval_every == 0 or step == total:
            rec = {"step": float(step), "loss": running / since, "seconds": time.perf_counter() - t0}
            running, since = 0.0, 0
            msg = f"[{cfg.name}] step {step}/{total} loss {rec['loss']:.4f} t={rec['seconds']:.0f}s"
            if evaluate is not None:
                rec["eval_acc"] = evaluate(model)
                msg += f" eval_acc {rec['eval_acc']:.4f}"
            history.append(rec)
            log(msg)
    return TrainResult(model, time.perf_counter() - t0, time.process_time() - c0, total, history)


def accuracy(model: CharModel, x: np.ndarray, y: np.ndarray) -> float:
    """Top-1 next-character accuracy of the numpy model.

    Args:
        model: Trained model.
        x: Input windows ``[N, C]``.
        y: Targets ``[N]``.

    Returns:
        Share of positions whose argmax equals the target.
    """
    return float((model.predict(x) == y).mean())


def export_onnx(model: CharModel, vocab: Sequence[str], metadata: Mapping[str, str], doc: str = "") -> onnx.ModelProto:
    """Build the ONNX model with :mod:`onnx.helper`.

    Args:
        model: Trained model.
        vocab: Vocabulary (index = id); stored in the metadata.
        metadata: Extra ``metadata_props`` (string values).
        doc: Graph doc string.

    Returns:
        A checked ONNX model: ``input_ids [batch, C] int64 -> probs [batch, V]
        float``, opset 17, IR version 9.
    """
    nodes, inits = model.onnx_graph()
    graph = helper.make_graph(
        nodes,
        "charlm",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", model.context])],
        [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["batch", model.vocab_size])],
        initializer=inits,
        doc_string=doc,
    )
    proto = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET)],
        producer_name="edgecascade-examples",
        ir_version=IR_VERSION,
    )
    set_metadata(proto, {"edgecascade.vocab": json.dumps(list(vocab)), **metadata})
    onnx.checker.check_model(proto, full_check=True)
    return proto


def weight_matmuls(proto: onnx.ModelProto) -> list[str]:
    """Names of MatMul nodes whose second input is a weight initializer.

    Dynamic quantisation of activation-by-activation matmuls (attention
    scores) costs accuracy for no size gain, so only these are quantised.

    Args:
        proto: Model to inspect.

    Returns:
        Node names.
    """
    weights = {t.name for t in proto.graph.initializer}
    return [n.name for n in proto.graph.node if n.op_type == "MatMul" and n.input[1] in weights]


def set_metadata(proto: onnx.ModelProto, props: Mapping[str, str]) -> None:
    """Insert or overwrite ``metadata_props`` entries in place.

    Args:
        proto: Model to modify.
        props: Key to string value.
    """
    merged = {p.key: p.value for p in proto.metadata_props}
    merged.update(props)
    del proto.metadata_props[:]
    for key in sorted(merged):
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, merged[key]
