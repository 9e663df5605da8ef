"""Staged training of Spatia's generator (Spatia §4, docs/spatia.md D14),
checkpointed and resumable.

Stages (`STAGES`; each initialised from its parent's final checkpoint):

  base       no memory: target + history + instruction; trains every non-control parameter
             (`spatia.model.BASE_PARAMS`). Also the "no memory" baseline (Wan2.2 of Table 6).
  control    parent base; control blocks copied from main layers `control_layers` with zero
             before/after projections (the output equals the base at step 0); trains only the
             control branch (`CONTROL_PARAMS`) on [projection video || hole mask]; base frozen.
  main       parent control; references + history + projection; control frozen. main_mode
             "lora" wraps the main blocks' q/k/v/o/FFN in LoRA and trains only those matrices
             (`LORA_PARAMS`), "full" trains all base parameters. History frames get
             t_aug ~ U[0, hist_noise_max] noise (Spatia supp. §6).
  main_proj  Table 4 ablation "projection only": as main, without references.
  main_refs  Table 4 ablation "references only": parent base, references, no control input.

# choice: LoRA for the main stage, as the paper does (rank 64 there): the base weights stay
# untouched, so the first clip of a rollout runs the plain base + control model exactly as the
# official inference does, all Table 4 variants share one base, and a stage checkpoint's
# trainable state is a few percent of the model.

The loss is `spatia.flow`'s velocity MSE on target tokens with logit-normal timesteps. Every
stage lives in `<run_dir>/stages/<name>/` (checkpoints, metrics.jsonl); its checkpoint holds the
whole train state (trainable + frozen parameters, AdamW state, step, RNG key) and the data
iterator's position, so a killed stage resumes to exactly the state an uninterrupted run reaches.
"""

from __future__ import annotations

import dataclasses
import functools
import pathlib
import sys
from collections.abc import Callable

import jax
import numpy as np
from flax import nnx

from common import train as ctrain
from common.checkpoint import Checkpointer
from common.config import to_dict
from common.metrics import MetricsWriter, Progress
from spatia import datasets, flow
from spatia import model as M
from spatia.config import SpatiaConfig

__all__ = [
    "StageSpec",
    "STAGES",
    "stage_order",
    "stage_optimizer",
    "stage_steps",
    "build_model",
    "initial_state",
    "stage_dir",
    "train_stage",
    "load_stage",
    "train_all",
    "trainable_filter",
    "validation_loss",
]


@dataclasses.dataclass(frozen=True)
class StageSpec:
    """A training stage: where it starts, what it trains and which batch keys it reads."""

    name: str
    parent: str | None
    kind: str  # "base" | "control" | "main" (selects steps, lr and the trainable filter)
    keys: tuple[str, ...]
    init_control: bool = False
    hist_noise: bool = False

    @property
    def uses_refs(self) -> bool:
        return "refs" in self.keys

    @property
    def uses_proj(self) -> bool:
        return "proj" in self.keys


_BASE_KEYS = ("frames", "prev", "instruction")
_PROJ_KEYS = ("proj", "hole")
_REF_KEYS = ("refs", "ref_valid")

STAGES: dict[str, StageSpec] = {
    s.name: s
    for s in (
        StageSpec("base", None, "base", _BASE_KEYS),
        StageSpec("control", "base", "control", _BASE_KEYS + _PROJ_KEYS, init_control=True),
        StageSpec("main", "control", "main", _BASE_KEYS + _PROJ_KEYS + _REF_KEYS, hist_noise=True),
        StageSpec("main_proj", "control", "main", _BASE_KEYS + _PROJ_KEYS, hist_noise=True),
        StageSpec("main_refs", "base", "main", _BASE_KEYS + _REF_KEYS, hist_noise=True),
    )
}


def stage_order(cfg: SpatiaConfig) -> list[str]:
    """Stages a full run trains, parents first."""
    names = ["base", "control", "main"]
    if cfg.train.ablations:
        names += ["main_proj", "main_refs"]
    return names


def _spec(name: str) -> StageSpec:
    if name not in STAGES:
        raise ValueError(f"unknown training stage {name!r}; valid stages: {sorted(STAGES)}")
    return STAGES[name]


def stage_steps(cfg: SpatiaConfig, name: str) -> int:
    """Number of optimizer steps of a stage."""
    t = cfg.train
    return {"base": t.base_steps, "control": t.control_steps, "main": t.main_steps}[
        _spec(name).kind
    ]


def _uses_lora(cfg: SpatiaConfig, spec: StageSpec) -> bool:
    return spec.kind == "main" and cfg.train.main_mode == "lora"


def trainable_filter(cfg: SpatiaConfig, name: str):
    """The nnx filter of the variables a stage trains (`spatia.model.STAGE_FILTERS`)."""
    spec = _spec(name)
    if spec.kind == "base":
        return M.STAGE_FILTERS["base"]
    if spec.kind == "control":
        return M.STAGE_FILTERS["control"]
    return M.STAGE_FILTERS["lora" if _uses_lora(cfg, spec) else "main_full"]


def stage_optimizer(cfg: SpatiaConfig, name: str) -> ctrain.OptimizerConfig:
    """AdamW, linear warm-up then constant lr (docs/spatia.md D9), per stage."""
    t = cfg.train
    lr = {"base": t.base_lr, "control": t.control_lr, "main": t.main_lr}[_spec(name).kind]
    steps = stage_steps(cfg, name)
    return ctrain.OptimizerConfig(
        name="adamw",
        learning_rate=lr,
        schedule="constant",
        warmup_steps=min(t.warmup_steps, steps),
        # The constant schedule ignores total_steps; fixing it keeps configs that differ only
        # in step counts on one compiled train step.
        total_steps=min(t.warmup_steps, steps) + 1,
        weight_decay=t.weight_decay,
        grad_clip_norm=t.grad_clip,
    )


def build_model(cfg: SpatiaConfig, name: str, parent: nnx.Module | None = None) -> M.VideoDiT:
    """A stage's model before training: the parent's weights (or a fresh init) + its changes.

    parent: the parent stage's trained model (consumed: its arrays are reused). None builds the
    stage's structure from a seeded init, which is what a restore needs as a target.
    """
    spec = _spec(name)
    model = parent if parent is not None else M.VideoDiT(cfg.model, rngs=nnx.Rngs(cfg.train.seed))
    if spec.init_control and parent is not None:
        M.init_control_from_main(model)
    if _uses_lora(cfg, spec):
        # A distinct stream per stage keeps the LoRA init reproducible and stage-specific.
        M.add_main_lora(model, rngs=nnx.Rngs(cfg.train.seed + 1000 + list(STAGES).index(name)))
    return model


def stage_dir(run_dir: str | pathlib.Path, name: str) -> pathlib.Path:
    return pathlib.Path(run_dir) / "stages" / name


def _stage_config(cfg: SpatiaConfig, name: str) -> dict:
    return {
        "stage": name,
        "model": to_dict(cfg.model),
        "data": to_dict(cfg.data),
        "train": to_dict(cfg.train),
    }


# Step counts and logging cadence may change between a run and its resumption.
_IGNORED = (
    "train.base_steps",
    "train.control_steps",
    "train.main_steps",
    "train.save_every",
    "train.log_every",
    "train.ablations",
)


def _checkpointer(cfg: SpatiaConfig, run_dir, name: str) -> Checkpointer:
    return Checkpointer(
        stage_dir(run_dir, name) / "checkpoints",
        max_to_keep=2,
        config=_stage_config(cfg, name),
        ignore_config_keys=_IGNORED,
    )


@functools.lru_cache(maxsize=32)
def _step_fn(graphdef, opt_cfg: ctrain.OptimizerConfig, hist_noise_max: float) -> Callable:
    # Cached on (graphdef, optimizer, loss options): stages and tests with the same structure
    # share one compiled step.
    loss = flow.make_loss_fn(hist_noise_max=hist_noise_max)
    return ctrain.make_train_step(graphdef, loss, ctrain.make_optimizer(opt_cfg))


def initial_state(cfg: SpatiaConfig, name: str, parent: nnx.Module | None):
    """(graphdef, TrainState at step 0, OptimizerConfig) of a stage built by `build_model`."""
    model = build_model(cfg, name, parent)
    opt_cfg = stage_optimizer(cfg, name)
    rng = jax.random.fold_in(jax.random.key(cfg.train.seed), list(STAGES).index(name))
    graphdef, state = ctrain.create_train_state(
        model, ctrain.make_optimizer(opt_cfg), rng, trainable=trainable_filter(cfg, name)
    )
    # Commit every array to the device: a restored checkpoint (and a parent's restored weights)
    # arrive committed, fresh arrays do not, and jit compiles the step once per combination.
    state = jax.device_put(state, jax.devices()[0])
    return graphdef, state, opt_cfg


def load_stage(cfg: SpatiaConfig, run_dir, name: str) -> tuple[nnx.GraphDef, ctrain.TrainState]:
    """(graphdef, state) of a stage's newest checkpoint; FileNotFoundError if it has none."""
    graphdef, state, _ = initial_state(cfg, name, None)
    with _checkpointer(cfg, run_dir, name) as ckpt:
        if ckpt.latest_step() is None:
            raise FileNotFoundError(
                f"stage {name!r} has no checkpoint under {stage_dir(run_dir, name)}"
            )
        state, _ = ckpt.restore(state)
    return graphdef, state


def _is_done(cfg: SpatiaConfig, run_dir, name: str) -> bool:
    with _checkpointer(cfg, run_dir, name) as ckpt:
        return ckpt.latest_step() == stage_steps(cfg, name)


def train_stage(
    cfg: SpatiaConfig,
    run_dir,
    name: str,
    data: dict,
    *,
    num_steps: int | None = None,
    verbose: bool = True,
) -> tuple[nnx.GraphDef, ctrain.TrainState]:
    """Trains (or resumes, or just loads) one stage; its parents must be trained already.

    Args:
      data: the training arrays of `spatia.datasets.load_dataset`.
      num_steps: stop at this step (default the stage's configured steps); a later call with a
        larger value resumes from the checkpoint.
    Returns: (graphdef, final state) of the stage.
    """
    spec = _spec(name)
    target = stage_steps(cfg, name) if num_steps is None else num_steps
    parent = None
    if spec.parent is not None:
        gd_p, st_p = load_stage(cfg, run_dir, spec.parent)
        parent = ctrain.merge_model(gd_p, st_p)
    graphdef, state, opt_cfg = initial_state(cfg, name, parent)
    hist = cfg.train.hist_noise_max if spec.hist_noise else 0.0
    step_fn = _step_fn(graphdef, opt_cfg, hist)
    it = datasets.batch_iterator(
        data, spec.keys, cfg.train.batch_size, seed=cfg.train.seed + list(STAGES).index(name)
    )
    directory = stage_dir(run_dir, name)
    directory.mkdir(parents=True, exist_ok=True)
    progress = Progress(target, name=name, stream=sys.stderr) if verbose else None
    with (
        _checkpointer(cfg, run_dir, name) as ckpt,
        MetricsWriter(directory / "metrics.jsonl") as mw,
    ):
        state = ctrain.train(
            state,
            step_fn,
            it,
            target,
            checkpointer=ckpt,
            save_every=cfg.train.save_every,
            metrics_writer=mw,
            log_every=cfg.train.log_every,
            progress=progress.update if progress else None,
        )
    return graphdef, state


def train_all(cfg: SpatiaConfig, run_dir, data: dict, *, verbose: bool = True) -> dict:
    """Trains every stage of `stage_order(cfg)` (resuming), returns {name: (graphdef, state)}."""
    out = {}
    for name in stage_order(cfg):
        if verbose:
            status = "done, loading" if _is_done(cfg, run_dir, name) else "training"
            print(f"[train] stage {name}: {status} ({stage_steps(cfg, name)} steps)", flush=True)
        out[name] = train_stage(cfg, run_dir, name, data, verbose=verbose)
    return out


def validation_loss(
    cfg: SpatiaConfig,
    graphdef,
    state,
    name: str,
    data: dict,
    *,
    num_batches: int = 4,
    seed: int = 0,
) -> float:
    """Mean flow-matching loss of a stage's model on `num_batches` batches of `data` (its keys),
    with fixed noise keys and no instruction dropout, so stages compare on equal draws."""
    spec = _spec(name)
    loss = _eval_loss_fn(graphdef)
    n = next(iter(data.values())).shape[0]
    bs = min(cfg.train.batch_size, n)
    total = 0.0
    for b in range(num_batches):
        idx = (np.arange(bs) + b * bs) % n
        batch = {k: data[k][idx] for k in spec.keys}
        total += float(loss(state.params, state.frozen, batch, jax.random.key(seed + b)))
    return total / num_batches


@functools.lru_cache(maxsize=16)
def _eval_loss_fn(graphdef):
    base_loss = flow.make_loss_fn(cond_drop_prob=0.0, ref_drop_prob=0.0, hist_noise_max=0.0)

    @jax.jit
    def f(params, frozen, batch, key):
        return base_loss(nnx.merge(graphdef, params, frozen), batch, key)[0]

    return f
