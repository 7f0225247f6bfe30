"""Numpy MLP character language model: training and ONNX export.

The model is the classic "neural probabilistic language model" shape: the last
``context`` characters are embedded, the embeddings are concatenated and fed
through one or more fully connected tanh layers, and a final linear layer plus
softmax gives the next-character distribution. It is small enough to train in
minutes with plain numpy (the matmuls go to BLAS) and exports to a handful of
standard ONNX ops (Gather, Reshape, MatMul, Add, Tanh, Softmax) that every
runtime supports and that dynamic int8 quantisation handles well.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from examples.charlm.corpus import PAD_ID, TokenStream

OPSET = 17
IR_VERSION = 9
# PAD is never a target; a fixed, very negative logit keeps its probability at
# ~1e-13 without spending any training signal on it.
PAD_LOGIT = -30.0


@dataclass(frozen=True)
class ModelConfig:
    """Architecture and training hyper-parameters of one char-LM.

    Attributes:
        name: Model name written to the ONNX metadata.
        context: Number of previous characters the model sees.
        embed: Embedding width per character.
        hidden: Width of each hidden tanh layer, in order.
        batch: Minibatch size.
        epochs: Passes over the training positions (may be fractional).
        lr: Peak Adam learning rate.
        weight_decay: Decoupled (AdamW) weight decay on matrices.
        dropout: Dropout rate on the hidden activations during training.
        seed: Seed for initialisation, shuffling and dropout.
    """

    name: str
    context: int
    embed: int
    hidden: tuple[int, ...]
    batch: int = 512
    epochs: float = 4.0
    lr: float = 3e-3
    weight_decay: float = 0.0
    dropout: float = 0.0
    seed: int = 0

    def describe(self) -> str:
        """Return a compact architecture string, e.g. ``ctx16-emb16-256-V72``."""
        layers = "-".join(str(h) for h in self.hidden)
        return f"MLP ctx{self.context} emb{self.embed} hidden[{layers}] tanh"


@dataclass
class CharMLP:
    """Parameters of the MLP; index ``i`` of the lists is hidden layer ``i``.

    Attributes:
        emb: Embedding table ``[V, E]``.
        weights: ``[C*E, H1], [H1, H2], ..., [Hn, V]`` (last is the output layer).
        biases: Matching bias vectors.
    """

    emb: np.ndarray
    weights: list[np.ndarray]
    biases: list[np.ndarray]
    context: int = field(default=0)

    @classmethod
    def init(cls, cfg: ModelConfig, vocab_size: int, rng: np.random.Generator) -> CharMLP:
        """Create freshly initialised parameters.

        Args:
            cfg: Model configuration.
            vocab_size: Number of ids including PAD and UNK.
            rng: Random generator (seeded by the caller for reproducibility).

        Returns:
            The initialised model.
        """
        emb = rng.normal(0.0, 1.0, (vocab_size, cfg.embed)).astype(np.float32)
        dims = [cfg.context * cfg.embed, *cfg.hidden, vocab_size]
        weights: list[np.ndarray] = []
        biases: list[np.ndarray] = []
        for i, (fan_in, fan_out) in enumerate(zip(dims[:-1], dims[1:], strict=True)):
            last = i == len(dims) - 2
            # Small output layer so the initial distribution is near uniform;
            # 1/sqrt(fan_in) keeps tanh units out of saturation at the start.
            scale = 0.1 / math.sqrt(fan_in) if last else 1.0 / math.sqrt(fan_in)
            weights.append(rng.normal(0.0, scale, (fan_in, fan_out)).astype(np.float32))
            biases.append(np.zeros(fan_out, dtype=np.float32))
        weights[-1][:, PAD_ID] = 0.0
        biases[-1][PAD_ID] = PAD_LOGIT
        return cls(emb, weights, biases, cfg.context)

    @property
    def vocab_size(self) -> int:
        """Number of output classes (ids)."""
        return int(self.emb.shape[0])

    def params(self) -> list[np.ndarray]:
        """Return all parameter arrays in a fixed order (for the optimiser)."""
        return [self.emb, *self.weights, *self.biases]

    def num_params(self) -> int:
        """Return the total number of scalar parameters."""
        return sum(int(p.size) for p in self.params())

    def logits(self, x: np.ndarray) -> np.ndarray:
        """Compute next-character logits without dropout.

        Args:
            x: Input ids ``[B, C]``.

        Returns:
            Logits ``[B, V]`` (float32).
        """
        h = self.emb[x].reshape(x.shape[0], -1)
        for w, b in zip(self.weights[:-1], self.biases[:-1], strict=True):
            h = np.tanh(h @ w + b)
        out: np.ndarray = h @ self.weights[-1] + self.biases[-1]
        return out

    def predict(self, x: np.ndarray, batch: int = 4096) -> np.ndarray:
        """Return the argmax next character for each window.

        Args:
            x: Input ids ``[N, C]``.
            batch: Evaluation batch size (bounds memory).

        Returns:
            Predicted ids ``[N]``.
        """
        preds = [self.logits(x[i : i + batch]).argmax(axis=1) for i in range(0, len(x), batch)]
        return np.concatenate(preds) if preds else np.zeros(0, dtype=np.int64)

    def loss_and_grads(
        self, x: np.ndarray, y: np.ndarray, dropout: float, rng: np.random.Generator
    ) -> tuple[float, list[np.ndarray]]:
        """Forward and backward pass for one minibatch.

        Args:
            x: Input ids ``[B, C]``.
            y: Target ids ``[B]``.
            dropout: Dropout rate on hidden activations.
            rng: Generator for the dropout masks.

        Returns:
            Mean cross-entropy (nats) and gradients in :meth:`params` order.
        """
        n = x.shape[0]
        h0 = self.emb[x].reshape(n, -1)
        acts = [h0]
        masks: list[np.ndarray | None] = []
        h = h0
        for w, b in zip(self.weights[:-1], self.biases[:-1], strict=True):
            h = np.tanh(h @ w + b)
            mask: np.ndarray | None = None
            if dropout > 0.0:
                mask = (rng.random(h.shape, dtype=np.float32) >= dropout).astype(np.float32)
                mask *= np.float32(1.0 / (1.0 - dropout))
                h = h * mask
            masks.append(mask)
            acts.append(h)
        logits = h @ self.weights[-1] + self.biases[-1]
        logits -= logits.max(axis=1, keepdims=True)
        probs = np.exp(logits)
        probs /= probs.sum(axis=1, keepdims=True)
        rows = np.arange(n)
        loss = float(-np.log(probs[rows, y] + 1e-12).mean())

        grad = probs
        grad[rows, y] -= 1.0
        grad /= n
        gw: list[np.ndarray] = [np.empty(0)] * len(self.weights)
        gb: list[np.ndarray] = [np.empty(0)] * len(self.biases)
        for i in range(len(self.weights) - 1, -1, -1):
            gw[i] = acts[i].T @ grad
            gb[i] = grad.sum(axis=0)
            if i == 0:
                break
            grad = grad @ self.weights[i].T
            mask_i = masks[i - 1]
            if mask_i is not None:
                grad *= mask_i
                # tanh' from the pre-dropout activation: a / mask where kept.
                pre = np.divide(acts[i], mask_i, out=np.zeros_like(acts[i]), where=mask_i > 0)
            else:
                pre = acts[i]
            grad *= 1.0 - pre * pre
        gb[-1][PAD_ID] = 0.0
        gw[-1][:, PAD_ID] = 0.0
        d_h0 = (grad @ self.weights[0].T).reshape(n * self.context, -1)
        # Scatter-add through a one-hot matmul: BLAS beats np.add.at here
        # because the vocabulary is small.
        onehot = np.zeros((n * self.context, self.vocab_size), dtype=np.float32)
        onehot[np.arange(n * self.context), x.reshape(-1)] = 1.0
        g_emb = onehot.T @ d_h0
        return loss, [g_emb, *gw, *gb]


@dataclass
class TrainResult:
    """Outcome of :func:`train`.

    Attributes:
        model: Trained parameters.
        seconds: Wall-clock training time.
        cpu_seconds: Process CPU time spent training (all threads).
        steps: Optimiser steps taken.
        history: ``(step, mean train loss, optional eval accuracy)`` records.
    """

    model: CharMLP
    seconds: float
    cpu_seconds: float
    steps: int
    history: list[dict[str, float]]


def train(
    cfg: ModelConfig,
    stream: TokenStream,
    vocab_size: int,
    evaluate: Callable[[CharMLP], float] | None = None,
    log: Callable[[str], None] = print,
    eval_every: int = 2000,
) -> TrainResult:
    """Train a :class:`CharMLP` with AdamW and a warmup + cosine schedule.

    Args:
        cfg: Model and training configuration.
        stream: Training positions (context must equal ``cfg.context``).
        vocab_size: Number of ids.
        evaluate: Optional callback returning an accuracy, for progress logs
            only (it never influences training).
        log: Sink for progress lines.
        eval_every: Steps between progress lines.

    Returns:
        The trained model and timing information.
    """
    if stream.context != cfg.context:
        raise ValueError(f"stream context {stream.context} != model context {cfg.context}")
    rng = np.random.default_rng(cfg.seed)
    model = CharMLP.init(cfg, vocab_size, rng)
    params = model.params()
    m1 = [np.zeros_like(p) for p in params]
    m2 = [np.zeros_like(p) for p in params]
    beta1, beta2, eps = 0.9, 0.99, 1e-8
    decayed = {id(w) for w in model.weights}

    n_pos = len(stream.targets)
    steps_per_epoch = max(1, n_pos // cfg.batch)
    total = max(1, int(cfg.epochs * steps_per_epoch))
    warmup = min(500, total // 20)
    history: list[dict[str, float]] = []
    t0, c0 = time.perf_counter(), time.process_time()
    order = rng.permutation(n_pos)
    cursor = 0
    running = 0.0
    for step in range(1, total + 1):
        if cursor + cfg.batch > n_pos:
            order = rng.permutation(n_pos)
            cursor = 0
        pos = stream.targets[order[cursor : cursor + cfg.batch]]
        cursor += cfg.batch
        x, y = stream.windows(pos)
        loss, grads = model.loss_and_grads(x, y, cfg.dropout, rng)
        running += loss

        if step <= warmup:
            lr = cfg.lr * step / warmup
        else:
            frac = (step - warmup) / max(1, total - warmup)
            lr = cfg.lr * (0.02 + 0.98 * 0.5 * (1.0 + math.cos(math.pi * frac)))
        bc1 = 1.0 - beta1**step
        bc2 = 1.0 - beta2**step
        for p, g, a, b in zip(params, grads, m1, m2, strict=True):
            a *= beta1
            a += (1.0 - beta1) * g
            b *= beta2
            b += (1.0 - beta2) * (g * g)
            if cfg.weight_decay and id(p) in decayed:
                p *= 1.0 - lr * cfg.weight_decay
            p -= (lr / bc1) * a / (np.sqrt(b / bc2) + eps)

        if step % eval_every == 0 or step == total:
            rec: dict[str, float] = {
                "step": float(step),
                "loss": running / (eval_every if step % eval_every == 0 else step % eval_every),
                "seconds": time.perf_counter() - t0,
            }
            running = 0.0
            msg = f"[{cfg.name}] step {step}/{total} loss {rec['loss']:.4f} t={rec['seconds']:.0f}s"
            if evaluate is not None:
                rec["eval_acc"] = evaluate(model)
                msg += f" eval_acc {rec['eval_acc']:.4f}"
            history.append(rec)
            log(msg)
    return TrainResult(
        model, time.perf_counter() - t0, time.process_time() - c0, total, history
    )


def accuracy(model: CharMLP, x: np.ndarray, y: np.ndarray) -> float:
    """Top-1 next-character accuracy of the numpy model.

    Args:
        model: Trained model.
        x: Input windows ``[N, C]``.
        y: Targets ``[N]``.

    Returns:
        Share of positions whose argmax equals the target.
    """
    return float((model.predict(x) == y).mean())


def export_onnx(
    model: CharMLP, vocab: Sequence[str], metadata: Mapping[str, str], doc: str = ""
) -> onnx.ModelProto:
    """Write the model as an ONNX graph with :mod:`onnx.helper`.

    The graph is ``input_ids [batch, C] int64 -> Gather -> Reshape [batch, C*E]
    -> (MatMul, Add, Tanh)* -> MatMul, Add -> Softmax -> probs [batch, V]``.

    Args:
        model: Trained model.
        vocab: Vocabulary (index = id); stored in the metadata.
        metadata: Extra ``metadata_props`` (string values).
        doc: Graph doc string.

    Returns:
        A checked ONNX model (opset 17, IR version 9).
    """
    c, e = model.context, model.emb.shape[1]
    v = model.vocab_size
    inits = [
        numpy_helper.from_array(model.emb, "embedding"),
        numpy_helper.from_array(np.array([-1, c * e], dtype=np.int64), "flat_shape"),
    ]
    nodes = [
        helper.make_node("Gather", ["embedding", "input_ids"], ["embedded"], axis=0),
        helper.make_node("Reshape", ["embedded", "flat_shape"], ["h0"]),
    ]
    h = "h0"
    n_layers = len(model.weights)
    for i, (w, b) in enumerate(zip(model.weights, model.biases, strict=True)):
        inits.append(numpy_helper.from_array(w, f"w{i}"))
        inits.append(numpy_helper.from_array(b, f"b{i}"))
        last = i == n_layers - 1
        mm, pre = f"mm{i}", ("logits" if last else f"z{i}")
        nodes.append(helper.make_node("MatMul", [h, f"w{i}"], [mm]))
        nodes.append(helper.make_node("Add", [mm, f"b{i}"], [pre]))
        if not last:
            nodes.append(helper.make_node("Tanh", [pre], [f"h{i + 1}"]))
            h = f"h{i + 1}"
    nodes.append(helper.make_node("Softmax", ["logits"], ["probs"], axis=-1))
    graph = helper.make_graph(
        nodes,
        "charlm",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", c])],
        [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["batch", v])],
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
    onnx.checker.check_model(proto)
    return proto


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


def config_dict(cfg: ModelConfig) -> dict[str, object]:
    """Return the configuration as JSON-serialisable data."""
    data = asdict(cfg)
    data["hidden"] = list(cfg.hidden)
    return data
