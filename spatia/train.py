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
Each stage runs through `common.train.run_stage` (checkpoints, metrics, progress, the device
mesh: state replicated, batches split over the `data` axis) with its step from
`common.train.STEPS`.
"""

from __future__ import annotations

import dataclasses
import pathlib

import jax
import numpy as np
from flax import nnx

from common import distributed as dist
from common import train as ctrain
from common.checkpoint import Checkpointer
from common.config import to_dict
from common.rng import stream_key, stream_seed
from spatia import datasets, flow
from spatia import model as M
from spatia.config import SpatiaConfig, StageConfig

__all__ = [
    "StageSpec",
    "STAGES",
    "stage_order",
    "stage_config",
    "stage_optimizer",
    "stage_steps",
    "stage_step",
    "build_model",
    "initial_state",
    "stage_dir",
    "train_stage",
    "load_stage",
    "is_trained",
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


def stage_config(cfg: SpatiaConfig, name: str) -> StageConfig:
    """The `StageConfig` (steps, optim) of a stage: the ablations share the main stage's."""
    t = cfg.train
    return {"base": t.base, "control": t.control, "main": t.main}[_spec(name).kind]


def stage_steps(cfg: SpatiaConfig, name: str) -> int:
    """Number of optimizer steps of a stage."""
    return stage_config(cfg, name).steps


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
    """The optimiser of a stage (`train.<base|control|main>.optim`, docs/spatia.md D9)."""
    return stage_config(cfg, name).optim


def stage_step(cfg: SpatiaConfig, name: str, graphdef: nnx.GraphDef):
    """The jitted train step `(state, batch) -> (state, metrics)` of a stage: the flow-matching
    velocity loss (history noise t_aug ~ U[0, hist_noise_max] in the stages that use it) and
    the stage's optimiser. Built once per (structure, optimiser, loss) by `common.train.STEPS`,
    so stages and runs of one structure share one compiled step."""
    hist = cfg.train.hist_noise_max if _spec(name).hist_noise else 0.0
    return ctrain.STEPS.train_step(
        graphdef,
        stage_optimizer(cfg, name),
        flow.make_loss_fn(hist_noise_max=hist),
        loss_key=("spatia_flow", hist),
    )


def build_model(cfg: SpatiaConfig, name: str, parent: nnx.Module | None = None) -> M.VideoDiT:
    """A stage's model before training: the parent's weights (or a fresh init) + its changes.

    parent: the parent stage's trained model (consumed: its arrays are reused). None builds the
    stage's structure from a seeded init, which is what a restore needs as a target.
    """
    spec = _spec(name)
    model = parent
    if model is None:
        model = M.VideoDiT(cfg.model, rngs=nnx.Rngs(stream_seed(cfg.train.seed, "model")))
    if spec.init_control and parent is not None:
        M.init_control_from_main(model)
    if _uses_lora(cfg, spec):
        # A stream per stage keeps the LoRA init reproducible and stage-specific.
        M.add_main_lora(model, rngs=nnx.Rngs(stream_seed(cfg.train.seed, "lora", name)))
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
    "train.base.steps",
    "train.control.steps",
    "train.main.steps",
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


def _on_mesh(tree, mesh=None):
    """`tree` replicated on `mesh` (default: every device), as `common.train.run_stage` places
    a state: fresh, restored and trained states then share one sharding, so the compiled train
    step and eval loss serve all of them without recompiling."""
    mesh = dist.make_mesh() if mesh is None else mesh
    if jax.process_count() > 1:
        return dist.replicate(tree, mesh)
    return jax.device_put(tree, dist.replicated(mesh))


def initial_state(cfg: SpatiaConfig, name: str, parent: nnx.Module | None, *, mesh=None):
    """(graphdef, TrainState at step 0, OptimizerConfig) of a stage built by `build_model`,
    replicated over `mesh` (default: every device)."""
    model = build_model(cfg, name, parent)
    opt_cfg = stage_optimizer(cfg, name)
    graphdef, state = ctrain.create_train_state(
        model,
        ctrain.STEPS.optimizer(opt_cfg),
        stream_key(cfg.train.seed, "train", name),
        trainable=trainable_filter(cfg, name),
    )
    return graphdef, _on_mesh(state, mesh), opt_cfg


def load_stage(
    cfg: SpatiaConfig, run_dir, name: str, *, mesh=None
) -> tuple[nnx.GraphDef, ctrain.TrainState]:
    """(graphdef, state) of a stage's newest checkpoint, replicated over `mesh` (default: every
    device; the sharding `train_stage` produces); FileNotFoundError if it has none."""
    graphdef, state, _ = initial_state(cfg, name, None, mesh=mesh)
    with _checkpointer(cfg, run_dir, name) as ckpt:
        if ckpt.latest_step() is None:
            raise FileNotFoundError(
                f"stage {name!r} has no checkpoint under {stage_dir(run_dir, name)}"
            )
        state, _ = ckpt.restore(state)
    return graphdef, state


def is_trained(cfg: SpatiaConfig, run_dir, name: str) -> bool:
    """Whether a stage's newest checkpoint is at its configured number of steps."""
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
    mesh=None,
) -> tuple[nnx.GraphDef, ctrain.TrainState]:
    """Trains (or resumes, or just loads) one stage; its parents must be trained already.

    Args:
      data: the training arrays of `spatia.datasets.load_dataset`.
      num_steps: stop at this step (default the stage's configured steps); a later call with a
        larger value resumes from the checkpoint.
      mesh: the device mesh (default: every device, `common.train.run_stage`); the state is
        replicated on it and each batch split over its `data` axis.
    Returns: (graphdef, final state) of the stage, replicated on the mesh.
    """
    spec = _spec(name)
    target = stage_steps(cfg, name) if num_steps is None else num_steps
    parent = None
    if spec.parent is not None:
        gd_p, st_p = load_stage(cfg, run_dir, spec.parent, mesh=mesh)
        parent = ctrain.merge_model(gd_p, st_p)
    graphdef, state, _ = initial_state(cfg, name, parent, mesh=mesh)
    step_fn = stage_step(cfg, name, graphdef)
    it = datasets.batch_iterator(
        data, spec.keys, cfg.train.batch_size, seed=stream_seed(cfg.train.seed, "data", name)
    )
    result = ctrain.run_stage(
        name,
        state,
        step_fn,
        it,
        target,
        directory=stage_dir(run_dir, name),
        checkpoint_config=_stage_config(cfg, name),
        ignore_config_keys=_IGNORED,
        max_to_keep=2,
        save_every=cfg.train.save_every,
        log_every=cfg.train.log_every,
        verbose=verbose,
        mesh=mesh,
    )
    return graphdef, result.state


def train_all(cfg: SpatiaConfig, run_dir, data: dict, *, verbose: bool = True) -> dict:
    """Trains every stage of `stage_order(cfg)` (resuming), returns {name: (graphdef, state)}."""
    out = {}
    for name in stage_order(cfg):
        if verbose:
            status = "done, loading" if is_trained(cfg, run_dir, name) else "training"
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
    loss = ctrain.STEPS.get(("spatia_eval_loss", graphdef), lambda: _eval_loss_fn(graphdef))
    n = next(iter(data.values())).shape[0]
    bs = min(cfg.train.batch_size, n)
    total = 0.0
    for b in range(num_batches):
        idx = (np.arange(bs) + b * bs) % n
        batch = {k: data[k][idx] for k in spec.keys}
        key = stream_key(seed, "validation", b)
        total += float(loss(state.params, state.frozen, batch, key))
    return total / num_batches


def _eval_loss_fn(graphdef):
    base_loss = flow.make_loss_fn(cond_drop_prob=0.0, ref_drop_prob=0.0, hist_noise_max=0.0)

    @jax.jit
    def f(params, frozen, batch, key):
        return base_loss(nnx.merge(graphdef, params, frozen), batch, key)[0]

    return f
