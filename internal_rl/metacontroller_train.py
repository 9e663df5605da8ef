"""Training the metacontroller on expert data (internal RL App. C.4, C.6;
docs/internal_rl.md D22).

Three variants share one trainer (`train_metacontroller`, a `common.train.run_stage`), each
in its own directory `run_dir/metacontroller/<name>/` with orbax checkpoints (model,
optimizer, step, RNG, data position), so an interrupted run resumes to the result it would
have had:

* frozen (the paper's setting): θ is the pretrained base model and stays fixed; φ is
  trained on action NLL + α·KL (KL charged at every valid step, `metacontroller_loss`);
* forced resets (`temporal_abstraction=False`): the same with β ≡ 1 (the Fig. 8 baseline);
* co-trained (`cotrain=True`): θ and φ trained jointly, θ from scratch on the grid (App. C.6)
  or from the pretrained weights (`mctrain.cotrain_from_scratch=False`, the ant's setup).

`evaluate_variant` measures NLL, KL, switches per trajectory and switch precision/recall
against ground-truth subgoal boundaries (±1 step) on held-out expert batches;
`run_alpha_sweep` trains and evaluates a list of α values (the rate–distortion sweep, Fig. 7),
skipping variants whose results file already exists.

`cfg` is a grid-world or a continuous-pinpad config (`internal_rl.pipeline`): the trainer
is the same, the base model, data (D*, noise-free for the continuous expert) and
checkpoint keys come from the config's family.
"""

from __future__ import annotations

import dataclasses
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from common.checkpoint import Checkpointer
from common.config import to_dict
from common.report import StageClock
from common.rng import stream_key, stream_seed
from common.train import (
    STEPS,
    OptimizerConfig,
    TrainState,
    create_train_state,
    merge_model,
    run_stage,
)
from internal_rl.metacontroller import (
    MetacontrolledModel,
    MetacontrollerConfig,
    metacontroller_loss,
    trainable_filter,
)
from internal_rl.models.hawk import HawkModel
from internal_rl.models.transformer import BaseModel
from internal_rl.pipeline import PipelineConfig, stages
from internal_rl.rollouts import host_array
from internal_rl.stage import PRETRAIN_IGNORE

# The named random streams of this stage (`common.rng.stream_seed(cfg.seed, *name)`).
EVAL_STREAM = ("metacontroller", "eval")


@dataclasses.dataclass(frozen=True)
class Variant:
    """One metacontroller training run: α, β ≡ 1 or not, frozen or co-trained, seed."""

    alpha: float
    temporal_abstraction: bool = True
    cotrain: bool = False
    seed: int = 0

    @property
    def name(self) -> str:
        kind = "cotrained" if self.cotrain else "frozen"
        if not self.temporal_abstraction:
            kind += "_beta1"
        return f"{kind}_alpha{self.alpha:g}_seed{self.seed}"

    def mc_config(self, base_cfg: MetacontrollerConfig) -> MetacontrollerConfig:
        return dataclasses.replace(
            base_cfg,
            kl_weight=float(self.alpha),
            temporal_abstraction=self.temporal_abstraction,
            cotrain=self.cotrain,
        )


def variant_dir(run_dir: str | pathlib.Path, variant: Variant) -> pathlib.Path:
    return pathlib.Path(run_dir) / "metacontroller" / variant.name


def optimizer_config(cfg: PipelineConfig, variant: Variant) -> OptimizerConfig:
    """mctrain.cotrain_optim for co-trained variants, mctrain.optim otherwise."""
    return cfg.mctrain.cotrain_optim if variant.cotrain else cfg.mctrain.optim


def num_steps(cfg: PipelineConfig, variant: Variant) -> int:
    return cfg.mctrain.cotrain_steps if variant.cotrain else cfg.mctrain.steps


def _initial_base(
    cfg: PipelineConfig, run_dir: pathlib.Path, variant: Variant, base: BaseModel | HawkModel | None
) -> BaseModel | HawkModel:
    """θ at the start of training: the pretrained model, or a fresh one when co-training
    from scratch. `base` (if given) replaces the pretrained checkpoint (tests, notebooks)."""
    if variant.cotrain and cfg.mctrain.cotrain_from_scratch:
        return stages(cfg).build_model(cfg)
    if base is not None:
        # a copy with its own buffers: the train step donates the state it is given
        graphdef, state = nnx.split(base)
        return nnx.merge(graphdef, jax.tree.map(jnp.copy, state))
    return stages(cfg).load_base_model(cfg, run_dir)


def init_variant(cfg: PipelineConfig, variant: Variant, base: BaseModel | HawkModel):
    """(graphdef, TrainState, tx) of a metacontroller (φ freshly initialised) over `base`."""
    mc_cfg = variant.mc_config(cfg.metacontroller)
    model = MetacontrolledModel(
        base, mc_cfg, rngs=nnx.Rngs(stream_seed(cfg.seed, "metacontroller", "init", variant.seed))
    )
    tx = STEPS.optimizer(optimizer_config(cfg, variant))
    graphdef, state = create_train_state(
        model,
        tx,
        stream_key(cfg.seed, "metacontroller", "train", variant.seed),
        trainable=trainable_filter(mc_cfg),
    )
    return graphdef, state, tx


# Settings that do not change the trajectory of a variant's training:
IGNORE = PRETRAIN_IGNORE + (
    "mctrain.alphas",
    "mctrain.seeds",
    "mctrain.save_every",
    "mctrain.log_every",
    "mctrain.eval_batches",
    "mctrain.trace_examples",
    "mctrain.steps",
    "mctrain.cotrain_steps",
    "mctrain.optim.total_steps",
    "mctrain.cotrain_optim.total_steps",
)


def checkpoint_config(cfg: PipelineConfig, variant: Variant) -> dict:
    """The config a variant's checkpoints are checked against on restore."""
    return dict(
        stages(cfg).pretrain_checkpoint_config(cfg),
        metacontroller=to_dict(variant.mc_config(cfg.metacontroller)),
        mctrain=to_dict(cfg.mctrain),
        variant=dataclasses.asdict(variant),
    )


def train_metacontroller(
    cfg: PipelineConfig,
    run_dir: str | pathlib.Path,
    variant: Variant,
    *,
    base: BaseModel | HawkModel | None = None,
    steps: int | None = None,
    verbose: bool = True,
) -> tuple[nnx.GraphDef, TrainState]:
    """Trains (or resumes) `variant` to `steps` (default from cfg.mctrain); returns
    (graphdef, TrainState). Metrics go to run_dir/metacontroller/<name>/metrics.jsonl."""
    run_dir = pathlib.Path(run_dir)
    graphdef, state, _ = init_variant(cfg, variant, _initial_base(cfg, run_dir, variant, base))
    step_fn = STEPS.train_step(graphdef, optimizer_config(cfg, variant), metacontroller_loss)
    data = stages(cfg).make_dataset(
        cfg, ("metacontroller", "data", variant.seed), cfg.mctrain.batch_size, star=True
    )
    total = num_steps(cfg, variant) if steps is None else steps
    res = run_stage(
        f"metacontroller {variant.name}",
        state,
        step_fn,
        data,
        total,
        directory=variant_dir(run_dir, variant),
        checkpoint_config=checkpoint_config(cfg, variant),
        ignore_config_keys=IGNORE,
        max_to_keep=1,
        save_every=cfg.mctrain.save_every,
        log_every=cfg.mctrain.log_every,
        verbose=verbose,
    )
    return graphdef, res.state


def load_variant(
    cfg: PipelineConfig,
    run_dir: str | pathlib.Path,
    variant: Variant,
    *,
    base: BaseModel | HawkModel | None = None,
) -> MetacontrolledModel:
    """The trained `variant` (latest checkpoint) as a module: `.base` is θ (the co-trained
    one for co-trained variants) and `.metacontroller` is φ."""
    run_dir = pathlib.Path(run_dir)
    graphdef, state, _ = init_variant(cfg, variant, _initial_base(cfg, run_dir, variant, base))
    with Checkpointer(
        variant_dir(run_dir, variant) / "checkpoints",
        max_to_keep=1,
        config=checkpoint_config(cfg, variant),
        ignore_config_keys=list(IGNORE),
    ) as ckpt:
        if ckpt.latest_step() is None:
            raise FileNotFoundError(
                f"no checkpoint for metacontroller variant {variant.name} "
                f"under {variant_dir(run_dir, variant)}"
            )
        state, _ = ckpt.restore(state)
    return merge_model(graphdef, state)


def make_eval_fn(graphdef: nnx.GraphDef):
    """Jitted (params, frozen, batch, key) -> dict of scalar metrics (`metacontroller_loss`
    with the loss added) and the per-step β f32 [B, T] of the posterior pass; one program
    per graphdef (`common.train.STEPS`)."""

    def run(params, frozen, batch, key):
        model = nnx.merge(graphdef, params, frozen)
        loss, metrics = metacontroller_loss(model, batch, key)
        _, mc = model(batch["obs"], batch["mask"].astype(bool), key)
        return dict(metrics, loss=loss), mc.beta

    return STEPS.get(("internal_rl.metacontroller_eval", graphdef), lambda: jax.jit(run))


def evaluate_variant(cfg: PipelineConfig, graphdef: nnx.GraphDef, state: TrainState) -> dict:
    """Metrics on cfg.mctrain.eval_batches held-out expert batches (means over batches)
    plus β traces of the first batch: {"metrics": {...}, "traces": {beta, subgoal, mask}}."""
    eval_fn = make_eval_fn(graphdef)
    data = stages(cfg).make_dataset(cfg, EVAL_STREAM, cfg.mctrain.batch_size, star=True)
    totals: dict[str, float] = {}
    traces = None
    for i in range(cfg.mctrain.eval_batches):
        # host copy: the program places it next to the (possibly mesh-replicated) params
        batch = jax.tree.map(np.asarray, data.batch_at(i))
        key = jax.random.fold_in(stream_key(cfg.seed, *EVAL_STREAM, "key"), i)
        metrics, beta = eval_fn(state.params, state.frozen, batch, key)
        for k, v in metrics.items():
            totals[k] = totals.get(k, 0.0) + float(host_array(v)) / cfg.mctrain.eval_batches
        if traces is None:
            n = cfg.mctrain.trace_examples
            traces = dict(
                beta=host_array(beta)[:n].tolist(),
                subgoal=np.asarray(batch["subgoal"][:n]).tolist(),
                mask=np.asarray(batch["mask"][:n]).tolist(),
            )
    totals["subgoals_per_trajectory"] = totals.pop("boundaries", float("nan"))
    return dict(metrics=totals, traces=traces)


def run_variant(
    cfg: PipelineConfig,
    run_dir: str | pathlib.Path,
    variant: Variant,
    *,
    base: BaseModel | HawkModel | None = None,
    verbose: bool = True,
    clock: StageClock | None = None,
) -> dict:
    """Train + evaluate `variant`; results cached in <variant dir>/results.json through
    `clock` (a `common.report.StageClock`, stage "metacontroller"), which keeps the compute
    seconds of cached results."""
    out = variant_dir(run_dir, variant) / "results.json"
    clock = StageClock() if clock is None else clock
    computed = []

    def compute():
        t0 = time.time()
        graphdef, state = train_metacontroller(cfg, run_dir, variant, base=base, verbose=verbose)
        computed.append(True)
        return dict(
            variant=dataclasses.asdict(variant),
            name=variant.name,
            step=int(host_array(state.step)),
            **evaluate_variant(cfg, graphdef, state),
            wall_seconds=time.time() - t0,
        )

    res = clock.cached("metacontroller", out, compute)
    if verbose and computed:
        m = res["metrics"]
        print(
            f"[metacontroller] {variant.name}: nll {m['action_nll']:.3f} kl {m['kl']:.3f} "
            f"switches {m['switches']:.2f} (subgoals {m['subgoals_per_trajectory']:.2f}) "
            f"precision {m['switch_precision']:.2f} recall {m['switch_recall']:.2f}",
            flush=True,
        )
    return res


def run_alpha_sweep(
    cfg: PipelineConfig,
    run_dir: str | pathlib.Path,
    alphas=None,
    *,
    cotrain: bool = False,
    temporal_abstraction: bool = True,
    seeds: int | None = None,
    base: BaseModel | HawkModel | None = None,
    verbose: bool = True,
    clock: StageClock | None = None,
) -> list[dict]:
    """`run_variant` for every α in `alphas` (default cfg.mctrain.alphas) × seed."""
    alphas = cfg.mctrain.alphas if alphas is None else tuple(alphas)
    seeds = cfg.mctrain.seeds if seeds is None else seeds
    return [
        run_variant(
            cfg,
            run_dir,
            Variant(float(a), temporal_abstraction, cotrain, s),
            base=base,
            verbose=verbose,
            clock=clock,
        )
        for a in alphas
        for s in range(seeds)
    ]


def select_alpha(results: list[dict]) -> float:
    """The α whose frozen variant best matches the ground-truth segmentation (highest
    F1 of switch precision/recall, ties to the lower NLL). The paper selects α by
    downstream RL success (C.5.5), which is too costly to sweep here."""
    if not results:
        raise ValueError("select_alpha: expected at least one sweep result")

    def score(r):
        m = r["metrics"]
        p, rc = m["switch_precision"], m["switch_recall"]
        f1 = 2 * p * rc / (p + rc) if p + rc > 0 else 0.0
        return (f1, -m["action_nll"])

    return float(max(results, key=score)["variant"]["alpha"])


def mean_metrics(results: list[dict]) -> dict[str, float]:
    """Per-metric mean over seeds of a list of results of one α."""
    keys = results[0]["metrics"].keys()
    return {k: float(jnp.mean(jnp.asarray([r["metrics"][k] for r in results]))) for k in keys}
