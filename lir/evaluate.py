"""Evaluation of lir models: multiple-choice accuracy and LIVR's latent-usage diagnostics.

Accuracy is the argmax of the answer-query logits over each example's valid choices
(``lir.model.choice_predictions``; for one-token answers this equals greedy decoding whenever
the first generated token is a choice, docs/lir.md D9). Diagnostics (LIVR §4.4.1), all on
the same examples and the same weights:

* ``accuracy``                     causal mask, latents present (the reported number);
* ``accuracy_latents_dropped``     causal mask, latent slots removed (``drop_latents``);
* ``accuracy_test_bottleneck``     the stage-1 bottleneck mask at test time (the image reaches
                                   the answer only through the latents);
* ``accuracy_bottleneck_dropped``  both: no route from the image to the answer at all, so
                                   this must sit at chance for every model;
* ``answer_latent_attention``      answer query's softmax mass on latent keys, averaged over
                                   heads, layers and examples (docs/lir.md D10).

Models without latents (K = 0 inputs) give ``accuracy_latents_dropped == accuracy`` and zero
latent attention by construction.

Each jitted evaluation function is built once per model structure (graphdef) and reused; the
model's full state is passed as a ``common.train.TrainState`` with everything in ``params``,
so models with different trainable partitions share one executable.
"""

from __future__ import annotations

from collections.abc import Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from common.train import TrainState, make_eval_step
from lir.data import Batch, drop_latents, take
from lir.masks import Role
from lir.model import (
    LMM,
    answer_latent_attention,
    attention_probs,
    choice_predictions,
    query_image_attention,
)

# (result key, mask variant, drop latents)
CONDITIONS = (
    ("accuracy", "causal", False),
    ("accuracy_latents_dropped", "causal", True),
    ("accuracy_test_bottleneck", "bottleneck", False),
    ("accuracy_bottleneck_dropped", "bottleneck", True),
)

_CACHE: dict = {}


def _eval_state(model: LMM) -> tuple[nnx.GraphDef, TrainState]:
    """(graphdef, TrainState holding the whole model state in ``params``)."""
    graphdef, state = nnx.split(model)
    return graphdef, TrainState(
        step=jnp.zeros((), jnp.int32),
        params=state,
        frozen=nnx.State({}),
        opt_state=(),
        rng=jax.random.key(0),
    )


def _predict_fn(model, batch, key):
    del key
    model.eval()  # LoRA dropout off
    return {"pred": choice_predictions(model(batch, "causal"), batch)}


def _diagnostic_fn(model, batch, key):
    del key
    model.eval()
    out = {}
    for name, variant, drop in CONDITIONS:
        b = drop_latents(batch) if drop else batch
        out[name] = choice_predictions(model(b, variant), b)
    out["answer_latent_attention"] = answer_latent_attention(model, batch, "causal")
    return out


def _step(graphdef, kind: str):
    key = (graphdef, kind)
    if key not in _CACHE:
        fn = {"predict": _predict_fn, "diagnostics": _diagnostic_fn}[kind]
        _CACHE[key] = make_eval_step(graphdef, fn)
    return _CACHE[key]


def chunks(data: Batch, batch_size: int) -> Iterator[tuple[Batch, np.ndarray]]:
    """``data`` in order as fixed-size batches; the last is padded by repeating row 0 and
    ``weight`` float32[batch_size] is 0 on the padding. A split smaller than ``batch_size``
    gives one batch of its own size (so tiny splits do not pay for padding)."""
    n = data.batch_size
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1; got {batch_size}")
    bs = min(batch_size, n)
    for start in range(0, n, bs):
        idx = np.arange(start, min(start + bs, n))
        w = np.ones(bs, np.float32)
        if len(idx) < bs:
            w[len(idx) :] = 0
            idx = np.concatenate([idx, np.zeros(bs - len(idx), idx.dtype)])
        yield take(data, idx), w


def predictions(model: LMM, data: Batch, batch_size: int = 100) -> np.ndarray:
    """Predicted answer token int32[N] under the causal mask (inputs as given)."""
    graphdef, state = _eval_state(model)
    step = _step(graphdef, "predict")
    out = [np.asarray(step(state, b)["pred"])[w > 0] for b, w in chunks(data, batch_size)]
    return np.concatenate(out)


def accuracy(model: LMM, data: Batch, batch_size: int = 100) -> float:
    """Fraction of ``data`` whose predicted choice is the gold answer (causal mask)."""
    return float(np.mean(predictions(model, data, batch_size) == data.answer))


def diagnostics(model: LMM, data: Batch, batch_size: int = 100) -> dict[str, float]:
    """Every quantity of the module docstring over ``data``, plus ``n`` (examples)."""
    graphdef, state = _eval_state(model)
    step = _step(graphdef, "diagnostics")
    sums = {name: 0.0 for name, _, _ in CONDITIONS}
    sums["answer_latent_attention"] = 0.0
    for b, w in chunks(data, batch_size):
        out = jax.device_get(step(state, b))
        for name, _, _ in CONDITIONS:
            sums[name] += float(np.sum((out[name] == b.answer) * w))
        sums["answer_latent_attention"] += float(np.sum(out["answer_latent_attention"] * w))
    n = data.batch_size
    return {**{k: v / n for k, v in sums.items()}, "n": n}


def latent_image_attention(model: LMM, batch: Batch, mask_variant: str = "causal") -> np.ndarray:
    """Mean attention of the latent queries to each image patch, averaged over layers, heads
    and latents: float32[B, M, n, n] (M image slots, n x n patch grid; LIVR Fig. 3)."""
    n_img = batch.images.shape[1]
    side = model.cfg.image_size // model.cfg.patch_size
    graphdef, state = nnx.split(model)

    @jax.jit
    def maps(state, batch):
        m = nnx.merge(graphdef, state)
        m.eval()
        probs = attention_probs(m, batch, mask_variant)
        q = query_image_attention(probs, batch, n_img, side * side)  # [B, S, M, N]
        is_lat = (batch.roles == Role.LATENT).astype(q.dtype)
        per = jnp.einsum("bsmn,bs->bmn", q, is_lat) / jnp.maximum(is_lat.sum(1), 1)[:, None, None]
        return per.reshape(per.shape[0], n_img, side, side)

    return np.asarray(maps(state, batch))
