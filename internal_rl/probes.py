"""Linear probes decoding the ground-truth subgoal from residual activations (internal RL App. C.2).

For every layer l = 0..L a probe `p(g_t | e_{t,l}) = softmax(W_l e_{t,l} + b_l)` is fit by
cross-entropy on the valid steps of expert trajectories with the base model frozen. All
layers are trained at once (vmapped) in one jitted `lax.scan` of AdamW minibatch steps.
Features are standardised per layer with training-set statistics (choice: an invertible
affine map, so the probe class is unchanged; it only conditions the optimisation).
Results: accuracy per layer and accuracy by position inside a subgoal segment.
"""

from __future__ import annotations

import json
import pathlib
import time
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from common.checkpoint import Checkpointer
from common.train import STEPS, OptimizerConfig
from internal_rl.models.transformer import BaseModel

# AdamW at a constant 1e-3, no clipping (Table A6)
PROBE_OPTIM = OptimizerConfig(learning_rate=1e-3, schedule="constant", grad_clip_norm=None)


class ProbeData(NamedTuple):
    """Valid tokens of a set of trajectories: feats f32 [L+1, N, D], labels int32 [N],
    seg_pos int32 [N] (steps since the segment began), t int32 [N] (time step)."""

    feats: np.ndarray
    labels: np.ndarray
    seg_pos: np.ndarray
    t: np.ndarray


class ProbeParams(NamedTuple):
    """w f32 [L+1, D, G], b f32 [L+1, G], mean/std f32 [L+1, 1, D] (feature standardisation)."""

    w: jax.Array
    b: jax.Array
    mean: jax.Array
    std: jax.Array


def collect(model: BaseModel, dataset, num_trajectories: int) -> ProbeData:
    """Residual streams of the frozen model at the valid steps of fresh expert batches.

    `dataset` yields `data.expert_batch` dicts; batches are drawn until num_trajectories
    trajectories were seen (the last batch may overshoot).
    """
    forward = jax.jit(lambda obs: model(obs, return_residuals=True).residuals)
    feats, labels, pos, ts = [], [], [], []
    seen = 0
    while seen < num_trajectories:
        batch = next(dataset)
        res = np.asarray(forward(batch["obs"]))  # [L+1, B, T, D]
        mask = np.asarray(batch["mask"])
        feats.append(res[:, mask])
        labels.append(np.asarray(batch["subgoal"])[mask])
        pos.append(np.asarray(batch["seg_pos"])[mask])
        ts.append(np.nonzero(mask)[1])
        seen += mask.shape[0]
    return ProbeData(
        np.concatenate(feats, axis=1),
        np.concatenate(labels).astype(np.int32),
        np.concatenate(pos).astype(np.int32),
        np.concatenate(ts).astype(np.int32),
    )


def _logits(params: ProbeParams, feats: jax.Array) -> jax.Array:
    """feats f32 [L+1, N, D] -> logits f32 [L+1, N, G]."""
    x = (feats - params.mean) / params.std
    return jnp.einsum("lnd,ldg->lng", x, params.w) + params.b[:, None]


def fit_probes(
    data: ProbeData,
    num_classes: int,
    key: jax.Array,
    steps: int,
    batch_size: int,
    optim: OptimizerConfig = PROBE_OPTIM,
) -> tuple[ProbeParams, np.ndarray]:
    """Trains one linear probe per layer with `optim` (AdamW, constant LR, no clipping by
    default); returns (params, train loss curve f32 [steps])."""
    feats = jnp.asarray(data.feats)
    labels = jnp.asarray(data.labels)
    n_layers, n, dim = feats.shape
    if n == 0:
        raise ValueError("fit_probes: no valid tokens in the probe data")
    mean = feats.mean(axis=1, keepdims=True)
    std = feats.std(axis=1, keepdims=True) + 1e-6
    params = ProbeParams(
        jnp.zeros((n_layers, dim, num_classes)), jnp.zeros((n_layers, num_classes)), mean, std
    )
    tx = STEPS.optimizer(optim)
    trainable = (params.w, params.b)

    def loss_fn(wb, idx):
        p = params._replace(w=wb[0], b=wb[1])
        logits = _logits(p, feats[:, idx])
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels[idx][None])
        return jnp.mean(ce, axis=1).sum()  # sum over layers: independent problems

    @jax.jit
    def run(wb, key):
        def step(carry, k):
            wb, opt = carry
            idx = jax.random.randint(k, (batch_size,), 0, n)
            loss, grads = jax.value_and_grad(loss_fn)(wb, idx)
            updates, opt = tx.update(grads, opt, wb)
            return (optax.apply_updates(wb, updates), opt), loss / n_layers

        (wb, _), losses = jax.lax.scan(step, (wb, tx.init(wb)), jax.random.split(key, steps))
        return wb, losses

    (w, b), losses = run(trainable, key)
    return params._replace(w=w, b=b), np.asarray(losses)


def evaluate_probes(params: ProbeParams, data: ProbeData, max_position: int) -> dict:
    """Accuracy per layer f32 [L+1], by segment position f32 [L+1, max_position] (positions
    >= max_position pooled into the last bin; NaN for empty bins), mean probability of the
    correct subgoal by position f32 [L+1, max_position], and the token count per bin."""
    logits = _logits(params, jnp.asarray(data.feats))
    probs = np.asarray(jax.nn.softmax(logits, axis=-1))
    labels = data.labels
    correct = (probs.argmax(-1) == labels[None]).astype(np.float64)  # [L+1, N]
    p_true = np.take_along_axis(probs, labels[None, :, None], axis=-1)[..., 0]
    bins = np.minimum(data.seg_pos, max_position - 1)
    counts = np.bincount(bins, minlength=max_position)
    by_pos = np.full((correct.shape[0], max_position), np.nan)
    p_by_pos = np.full_like(by_pos, np.nan)
    for p in range(max_position):
        sel = bins == p
        if sel.any():
            by_pos[:, p] = correct[:, sel].mean(axis=1)
            p_by_pos[:, p] = p_true[:, sel].mean(axis=1)
    chance = np.bincount(labels).max() / len(labels)
    return dict(
        accuracy=correct.mean(axis=1),
        accuracy_by_position=by_pos,
        p_true_by_position=p_by_pos,
        position_counts=counts,
        majority_baseline=float(chance),
        num_tokens=int(len(labels)),
    )


def probe_layers(
    model, train_dataset, eval_dataset, num_classes: int, probe_cfg, key: jax.Array, num_layers: int
) -> dict:
    """Fits one probe per residual layer on `train_dataset` trajectories and evaluates it on
    the independent `eval_dataset` (both expert datasets with `batch_at`). probe_cfg: a
    `ProbeConfig` (train/eval_trajectories, steps, batch_size, optim, max_position); num_layers = L + 1. Returns JSON-ready lists: per-layer train/eval
    accuracy, eval accuracy and p(correct) by position within a subgoal segment, chance and
    majority baselines, token counts and the probes' first/final training loss."""
    pc = probe_cfg
    train_data = collect(model, train_dataset, pc.train_trajectories)
    eval_data = collect(model, eval_dataset, pc.eval_trajectories)
    params, losses = fit_probes(train_data, num_classes, key, pc.steps, pc.batch_size, pc.optim)
    ev = evaluate_probes(params, eval_data, pc.max_position)
    tr = evaluate_probes(params, train_data, pc.max_position)
    return dict(
        layers=list(range(num_layers)),
        eval_accuracy=ev["accuracy"].tolist(),
        train_accuracy=tr["accuracy"].tolist(),
        eval_accuracy_by_position=ev["accuracy_by_position"].tolist(),
        eval_p_true_by_position=ev["p_true_by_position"].tolist(),
        position_counts=ev["position_counts"].tolist(),
        chance=1.0 / num_classes,
        majority_baseline=ev["majority_baseline"],
        train_tokens=tr["num_tokens"],
        eval_tokens=ev["num_tokens"],
        first_train_loss=float(losses[:20].mean()),
        final_train_loss=float(losses[-20:].mean()),
    )


def probe_checkpoints(run_dir, steps, probe_at) -> dict:
    """Probes the latest pretraining checkpoint of run_dir and the earlier `steps` present
    on disk (the accuracy-vs-training-step view, Fig. A1), writing run_dir/probe/results.json.
    probe_at(step or None for the latest) -> `probe_layers` dict."""
    run_dir = pathlib.Path(run_dir)
    out = run_dir / "probe"
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    results = probe_at(None)
    with Checkpointer(run_dir / "pretrain" / "checkpoints") as ckpt:
        available = set(ckpt.all_steps())
    by_step = {}
    for step in steps:
        if step not in available:
            print(f"[probe] no pretraining checkpoint at step {step}; skipped", flush=True)
            continue
        r = probe_at(step)
        by_step[str(step)] = dict(
            eval_accuracy=r["eval_accuracy"], train_accuracy=r["train_accuracy"]
        )
    results.update(by_checkpoint=by_step, wall_seconds=time.time() - t0)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    return results
