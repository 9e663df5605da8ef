"""A small functional training loop for Flax NNX models.

The model is split once into (graphdef, trainable params, everything else); a `jax.jit`-ed
pure step merges it inside, differentiates the loss w.r.t. the trainable params only and
applies an optax optimizer. The loop around it resumes from a `common.checkpoint.Checkpointer`
(state, optimizer, step, RNG key and data-iterator position), stops on a non-finite loss
without saving the bad state, logs metrics and runs periodic evals.

Typical use::

    graphdef, state = create_train_state(model, make_optimizer(opt_cfg), jax.random.key(0))
    step_fn = make_train_step(graphdef, loss_fn, make_optimizer(opt_cfg))
    state = train(state, step_fn, ArrayIterator(arrays, 32, seed=0), num_steps=1000,
                  checkpointer=Checkpointer(run_dir / "checkpoints"), save_every=100)

Bit-for-bit resume: each step's key is `fold_in(state.rng, state.step)` and the data iterator's
position is checkpointed with the state, so a run resumed from step k replays steps k..N exactly
as an uninterrupted run would (same machine, same shardings).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import pathlib
import time
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx, struct

from common import distributed as dist
from common.checkpoint import Checkpointer
from common.config import require
from common.data import ArrayIterator, DataIterator
from common.metrics import MetricsWriter, Progress

__all__ = [
    "ArrayIterator",
    "DataIterator",
    "NonFiniteLossError",
    "OptimizerConfig",
    "STEPS",
    "StageResult",
    "StepCache",
    "TrainState",
    "create_train_state",
    "evaluate",
    "make_eval_step",
    "make_optimizer",
    "make_schedule",
    "make_train_step",
    "merge_model",
    "run_stage",
    "train",
]

_OPTIMIZERS = ("adamw", "adam", "sgd")
_SCHEDULES = ("cosine", "constant")
# fold_in salt separating eval keys from the train keys of the same step.
_EVAL_KEY_SALT = 0x5EED


# --------------------------------------------------------------------------------------------
# Optimizer
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """Optimizer, schedule, clipping and accumulation settings.

    Step counts (`warmup_steps`, `total_steps`) count optimizer updates; with gradient
    accumulation one update takes `accumulation_steps` calls of the train step.
    `weight_decay` is decoupled for adamw and an L2 term added to the gradient for adam/sgd.
    `momentum` is used by sgd only.
    """

    name: str = "adamw"
    learning_rate: float = 1e-3
    schedule: str = "cosine"
    warmup_steps: int = 0
    total_steps: int = 1000
    end_lr_fraction: float = 0.0
    weight_decay: float = 0.0
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    grad_clip_norm: float | None = 1.0
    accumulation_steps: int = 1
    momentum: float = 0.0

    def __post_init__(self):
        req = functools.partial(require, self)
        req("name", self.name in _OPTIMIZERS, f"one of {_OPTIMIZERS}")
        req("schedule", self.schedule in _SCHEDULES, f"one of {_SCHEDULES}")
        req("learning_rate", self.learning_rate > 0, "> 0")
        req("warmup_steps", self.warmup_steps >= 0, ">= 0")
        req(
            "total_steps",
            self.schedule != "cosine" or self.total_steps > self.warmup_steps,
            f"> warmup_steps ({self.warmup_steps}) for the cosine schedule",
        )
        req("end_lr_fraction", 0.0 <= self.end_lr_fraction <= 1.0, "in [0, 1]")
        req("weight_decay", self.weight_decay >= 0, ">= 0")
        req(
            "grad_clip_norm",
            self.grad_clip_norm is None or self.grad_clip_norm >= 0,
            "None, 0 (off) or > 0",
        )
        req("accumulation_steps", self.accumulation_steps >= 1, ">= 1")


def make_schedule(cfg: OptimizerConfig) -> optax.Schedule:
    """Learning rate as a function of the optimizer-update count.

    cosine: linear 0 -> lr over `warmup_steps`, then cosine decay to `end_lr_fraction * lr`
    at `total_steps` (constant afterwards). constant: linear warmup, then lr.
    """
    lr = cfg.learning_rate
    if cfg.schedule == "cosine":
        main = optax.cosine_decay_schedule(
            lr, decay_steps=cfg.total_steps - cfg.warmup_steps, alpha=cfg.end_lr_fraction
        )
    else:
        main = optax.constant_schedule(lr)
    if cfg.warmup_steps == 0:
        return main
    warmup = optax.linear_schedule(0.0, lr, cfg.warmup_steps)
    return optax.join_schedules([warmup, main], [cfg.warmup_steps])


def make_optimizer(cfg: OptimizerConfig) -> optax.GradientTransformation:
    """clip_by_global_norm -> (L2 decay) -> optimizer scaled by `make_schedule(cfg)`.

    The chains are optax's own adamw/adam/sgd, except that the learning rate is applied by an
    `inject_hyperparams` stage, so the lr of each update is in the optimizer state (the train
    step reports it as a metric). With `accumulation_steps > 1` the chain is wrapped in
    `optax.MultiSteps`, which averages the gradients of k consecutive calls and applies one
    update on the k-th (clipping therefore acts on the averaged gradient).
    """
    parts = []
    if cfg.grad_clip_norm:
        parts.append(optax.clip_by_global_norm(cfg.grad_clip_norm))
    if cfg.name in ("adam", "sgd") and cfg.weight_decay:
        parts.append(optax.add_decayed_weights(cfg.weight_decay))
    if cfg.name in ("adamw", "adam"):
        parts.append(optax.scale_by_adam(b1=cfg.b1, b2=cfg.b2, eps=cfg.eps))
    elif cfg.momentum:
        parts.append(optax.trace(decay=cfg.momentum))
    if cfg.name == "adamw" and cfg.weight_decay:
        parts.append(optax.add_decayed_weights(cfg.weight_decay))
    parts.append(optax.inject_hyperparams(optax.scale_by_learning_rate)(make_schedule(cfg)))
    tx = optax.chain(*parts)
    if cfg.accumulation_steps > 1:
        tx = optax.MultiSteps(tx, every_k_schedule=cfg.accumulation_steps).gradient_transformation()
    return tx


def _injected_lr(opt_state: Any) -> jax.Array | None:
    """The learning rate of the latest update, if an `inject_hyperparams` stage holds one."""
    kinds = (optax.InjectHyperparamsState, optax.InjectStatefulHyperparamsState)
    for node in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, kinds)):
        if isinstance(node, kinds) and "learning_rate" in node.hyperparams:
            return node.hyperparams["learning_rate"]
    return None


# --------------------------------------------------------------------------------------------
# State and steps
# --------------------------------------------------------------------------------------------


@struct.dataclass
class TrainState:
    """Everything a resumed run needs besides the data position; a pytree.

    Attributes:
      step: int32 scalar, number of train-step calls so far.
      params: `nnx.State` of the trainable variables (those matching the `trainable` filter).
      frozen: `nnx.State` of every other variable (frozen params, batch stats, RNG state...).
      opt_state: optax state for `params` only.
      rng: base PRNG key; step s uses `jax.random.fold_in(rng, s)`.
    """

    step: jax.Array
    params: Any
    frozen: Any
    opt_state: Any
    rng: jax.Array


def create_train_state(
    model: nnx.Module,
    tx: optax.GradientTransformation,
    rng: jax.Array | int,
    trainable: Any = nnx.Param,
) -> tuple[nnx.GraphDef, TrainState]:
    """Splits `model` once into (graphdef, params, frozen) and initialises the optimizer.

    Args:
      model: the NNX module; its arrays are shared with the returned state (no copy).
      tx: the optimizer; `tx.init` sees only the trainable params.
      rng: a PRNG key (typed or raw uint32) or an int seed.
      trainable: nnx filter selecting the trained variables, e.g. `nnx.Param`,
        `nnx.LoRAParam`, `nnx.All(nnx.Param, nnx.PathContains("controller"))`. Everything
        else goes to `frozen` and is never touched by the optimizer.
    """
    if isinstance(rng, int):
        rng = jax.random.key(rng)
    graphdef, params, frozen = nnx.split(model, trainable, ...)
    if not jax.tree.leaves(params):
        raise ValueError(
            f"create_train_state: the trainable filter {trainable!r} matches no variable"
        )
    state = TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        frozen=frozen,
        opt_state=tx.init(params),
        rng=rng,
    )
    return graphdef, state


def merge_model(graphdef: nnx.GraphDef, state: TrainState) -> nnx.Module:
    """Rebuilds the module from a state (for eval or export).

    The module shares buffers with `state`; do not use it after that state was donated to a
    train step.
    """
    return nnx.merge(graphdef, state.params, state.frozen)


def _param_paths(params: nnx.State) -> frozenset:
    return frozenset(path for path, _ in nnx.to_flat_state(params))


def _resplit(model, params, frozen):
    """(params, frozen) of `model` along the same partition (and paths) as the inputs.

    Variables a forward pass adds (e.g. sown intermediates) are dropped, so the state keeps a
    fixed structure across steps (needed for donation and to avoid recompiling).
    """
    pp, fp = _param_paths(params), _param_paths(frozen)
    _, new_params, new_frozen, _ = nnx.split(
        model, lambda path, _: path in pp, lambda path, _: path in fp, ...
    )
    return new_params, new_frozen


def make_train_step(
    graphdef: nnx.GraphDef,
    loss_fn: Callable[[nnx.Module, Any, jax.Array], tuple[jax.Array, dict]],
    tx: optax.GradientTransformation,
    *,
    donate: bool = True,
    in_shardings: Any = None,
    out_shardings: Any = None,
) -> Callable[[TrainState, Any], tuple[TrainState, dict]]:
    """Builds `step_fn(state, batch) -> (state, metrics)`, jitted, donating `state`.

    Args:
      graphdef: from `create_train_state`.
      loss_fn: `(model, batch, key) -> (scalar loss, dict of scalar aux metrics)`. It may
        update non-trainable variables (batch stats, counters); those updates are kept.
      tx: the same optimizer passed to `create_train_state`.
      donate: donate the input state's buffers (the caller must not reuse them).
      in_shardings, out_shardings: passed to `jax.jit` when given; otherwise jit follows
        the inputs' shardings, so a state replicated and a batch sharded on a mesh run
        data-parallel unchanged.

    Metrics: loss, grad_norm (global norm of this call's gradient, before clipping),
    learning_rate (of the latest optimizer update; present when the optimizer has an
    `inject_hyperparams` lr stage, as `make_optimizer`'s do), plus loss_fn's aux.
    """

    def step_fn(state: TrainState, batch: Any) -> tuple[TrainState, dict]:
        key = jax.random.fold_in(state.rng, state.step)

        def compute_loss(params):
            # copy: fresh Variables at this trace level, so loss_fn may mutate non-trainable state.
            model = nnx.merge(graphdef, params, state.frozen, copy=True)
            loss, aux = loss_fn(model, batch, key)
            _, new_frozen = _resplit(model, params, state.frozen)
            return loss, (aux, new_frozen)

        (loss, (aux, new_frozen)), grads = jax.value_and_grad(compute_loss, has_aux=True)(
            state.params
        )
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads)}
        lr = _injected_lr(opt_state)
        if lr is not None:
            metrics["learning_rate"] = lr
        metrics.update(aux)
        new_state = state.replace(
            step=state.step + 1, params=params, frozen=new_frozen, opt_state=opt_state
        )
        return new_state, metrics

    jit_kwargs = {}
    if in_shardings is not None:
        jit_kwargs["in_shardings"] = in_shardings
    if out_shardings is not None:
        jit_kwargs["out_shardings"] = out_shardings
    return jax.jit(step_fn, donate_argnums=(0,) if donate else (), **jit_kwargs)


def make_eval_step(
    graphdef: nnx.GraphDef,
    eval_fn: Callable[[nnx.Module, Any, jax.Array], Any],
) -> Callable[[TrainState, Any], dict]:
    """Builds a jitted `eval_step(state, batch) -> dict of scalar metrics` (no donation).

    `eval_fn(model, batch, key)` returns a dict of scalars or a `(loss, aux_dict)` pair (so a
    train `loss_fn` can be reused; it becomes {"loss": loss, **aux}). The key is derived from
    the state's rng and step, distinct from that step's train key. The module is merged inside
    the jitted function, so any mutation of it during eval is discarded.
    """

    def eval_step(state: TrainState, batch: Any) -> dict:
        key = jax.random.fold_in(jax.random.fold_in(state.rng, state.step), _EVAL_KEY_SALT)
        out = eval_fn(nnx.merge(graphdef, state.params, state.frozen, copy=True), batch, key)
        if isinstance(out, tuple):
            loss, aux = out
            out = {"loss": loss, **aux}
        if not isinstance(out, Mapping):
            raise TypeError(
                f"make_eval_step: eval_fn must return a dict or (loss, aux_dict), got {type(out).__name__}"
            )
        return dict(out)

    return jax.jit(eval_step)


def evaluate(
    eval_step: Callable[[TrainState, Any], dict], state: TrainState, batches
) -> dict[str, float]:
    """Mean of `eval_step(state, b)` over an iterable of batches, as Python floats."""
    totals: dict[str, Any] = {}
    n = 0
    for batch in batches:
        out = eval_step(state, batch)
        totals = out if not totals else jax.tree.map(jnp.add, totals, out)
        n += 1
    if n == 0:
        raise ValueError("evaluate: `batches` is empty")
    return {k: float(v) / n for k, v in jax.device_get(totals).items()}


# --------------------------------------------------------------------------------------------
# Loop
# --------------------------------------------------------------------------------------------


class NonFiniteLossError(FloatingPointError):
    """The loss (or gradient norm) became NaN/inf; the run stopped without saving that state.

    Attributes:
      step: the step count the failing update would have produced (1-based).
      metrics: that step's metrics as floats.
      last_checkpoint: newest committed checkpoint step, or None.
    """

    def __init__(self, step: int, metrics: dict[str, float], last_checkpoint: int | None = None):
        self.step, self.metrics, self.last_checkpoint = step, metrics, last_checkpoint
        shown = ", ".join(f"{k}={v:.6g}" for k, v in metrics.items())
        where = (
            f"the last good checkpoint is step {last_checkpoint}"
            if last_checkpoint is not None
            else "no checkpoint was saved"
        )
        super().__init__(f"non-finite loss at step {step} ({shown}); state not saved, {where}")


def _to_float(x: Any) -> float:
    # Scalars from a multi-process mesh are replicated but not fully addressable.
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        x = x.addressable_data(0)
    return float(np.asarray(jax.device_get(x)))


def _to_floats(metrics: Mapping[str, Any]) -> dict[str, float]:
    return {k: _to_float(v) for k, v in metrics.items()}


def _checked(pending: list[tuple[int, dict]], checkpointer) -> None:
    """Raises NonFiniteLossError at the first pending step with a non-finite loss/grad_norm."""
    for step, metrics in pending:
        floats = _to_floats(metrics)
        if not all(math.isfinite(floats.get(k, 0.0)) for k in ("loss", "grad_norm")):
            last = checkpointer.latest_step() if checkpointer is not None else None
            raise NonFiniteLossError(step, floats, last)
    pending.clear()


def _every(step: int, period: int | None) -> bool:
    return bool(period) and step % period == 0


def train(
    state: TrainState,
    step_fn: Callable[[TrainState, Any], tuple[TrainState, dict]],
    data: DataIterator,
    num_steps: int,
    *,
    checkpointer: Any = None,
    save_every: int | None = None,
    eval_fn: Callable[[TrainState], Mapping[str, float]] | None = None,
    eval_every: int | None = None,
    metrics_writer: Any = None,
    log_every: int = 10,
    progress: Callable[[int, dict[str, float] | None], None] | None = None,
    check_finite_every: int = 1,
    place_batch: Callable[[Any], Any] | None = None,
) -> TrainState:
    """Runs `step_fn` until `state.step == num_steps`, resuming from `checkpointer` if it has one.

    Args:
      state: initial state (from `create_train_state`); if the checkpointer holds a
        checkpoint, it is replaced by the restored one (same shapes and shardings) and `data`
        is set to the saved position. Donated to `step_fn`: do not reuse it afterwards.
      step_fn: from `make_train_step`.
      data: a `DataIterator`.
      num_steps: the total number of `step_fn` calls to reach (not the number of additional
        steps); with gradient accumulation, `accumulation_steps` calls make one update.
      checkpointer: a `common.checkpoint.Checkpointer`, or None. A checkpoint is saved every
        `save_every` steps (if set) and always at the end.
      eval_fn: `eval_fn(state) -> {name: scalar}` every `eval_every` steps and at the end;
        written to `metrics_writer` with an "eval/" prefix. See `evaluate`.
      metrics_writer: any object with `.write(step: int, metrics: dict[str, float])`; gets the
        train metrics of every `log_every`-th step.
      progress: `progress(step, metrics)` after every step; `metrics` are the logged floats
        on `log_every` steps and None otherwise (no device sync), so
        `common.metrics.Progress(num_steps).update` fits.
      check_finite_every: how often the loss/grad_norm are fetched and checked. Every saved
        state, logged and evaluated step is checked regardless, and a larger value only
        avoids a device sync per step; all unchecked steps are checked at those points.
      place_batch: applied to each batch before the step, e.g. to shard it over a mesh.

    Returns:
      the final state (step == num_steps).

    Raises:
      NonFiniteLossError: a loss/grad_norm was not finite; the newest checkpoint (if any) is
        the last good state.
    """
    if num_steps < 0:
        raise ValueError(f"train: num_steps must be >= 0, got {num_steps}")
    if check_finite_every < 1:
        raise ValueError(f"train: check_finite_every must be >= 1, got {check_finite_every}")
    if checkpointer is not None and checkpointer.latest_step() is not None:
        state, data_state = checkpointer.restore(state)
        if data_state is not None:
            data.set_state(data_state)
    step = int(state.step)
    if step > num_steps:
        raise ValueError(f"train: the state is already at step {step}, past num_steps={num_steps}")

    pending: list[tuple[int, dict]] = []
    while step < num_steps:
        batch = data.next()
        if place_batch is not None:
            batch = place_batch(batch)
        state, metrics = step_fn(state, batch)
        step += 1
        pending.append((step, metrics))

        last = step == num_steps
        log = _every(step, log_every)
        save = checkpointer is not None and (_every(step, save_every) or last)
        run_eval = eval_fn is not None and (_every(step, eval_every) or last)
        if log or save or run_eval or last or _every(step, check_finite_every):
            _checked(pending, checkpointer)
        floats = _to_floats(metrics) if log else None
        if log and metrics_writer is not None:
            metrics_writer.write(step, floats)
        if save:
            checkpointer.save(step, state, data.get_state())
        if run_eval:
            results = _to_floats(eval_fn(state))
            if metrics_writer is not None:
                metrics_writer.write(step, {f"eval/{k}": v for k, v in results.items()})
        if progress is not None:
            progress(step, floats)

    if checkpointer is not None and checkpointer.latest_step() != step:
        # The loop did not run (the state was already at num_steps) and this state is not on
        # disk yet: the end of a run always has a checkpoint.
        checkpointer.save(step, state, data.get_state())
    return state


# --------------------------------------------------------------------------------------------
# Compiled-step cache
# --------------------------------------------------------------------------------------------


class StepCache:
    """Built (and so compiled-once) functions keyed by what determines their program.

    `jax.jit` caches compilations per function object, and `make_train_step` returns a new
    function each call; a stage that rebuilds its step for every task, seed or arm would
    recompile each time. Keying the built function on (graphdef, optimizer config, loss key)
    makes every run with the same structure reuse one executable. The cache is bounded
    (least recently used entries are dropped) so graphdefs of finished runs do not pile up.
    """

    def __init__(self, maxsize: int = 64):
        self.maxsize = maxsize
        self._items: dict[Any, Any] = {}

    def get(self, key: Any, build: Callable[[], Any]) -> Any:
        """The value stored under the hashable `key`, built by `build()` on first use."""
        if key in self._items:
            value = self._items.pop(key)
        else:
            value = build()
            if len(self._items) >= self.maxsize:
                self._items.pop(next(iter(self._items)))
        self._items[key] = value  # most recently used last
        return value

    def optimizer(self, cfg: OptimizerConfig) -> optax.GradientTransformation:
        """`make_optimizer(cfg)`, one object per config (so steps built on it can be shared)."""
        return self.get(("optimizer", cfg), lambda: make_optimizer(cfg))

    def train_step(
        self,
        graphdef: nnx.GraphDef,
        opt: OptimizerConfig,
        loss_fn: Callable,
        *,
        loss_key: Any = None,
        donate: bool = True,
    ) -> Callable[[TrainState, Any], tuple[TrainState, dict]]:
        """`make_train_step(graphdef, loss_fn, self.optimizer(opt))`, built once per key.

        Args:
          loss_key: hashable identity of the loss (e.g. `("pretrain", obs_coef)`); required
            when `loss_fn` is a closure or `functools.partial` built anew per call, whose
            identity would defeat the cache. Default: `loss_fn` itself.
        """
        key = ("train_step", graphdef, opt, loss_fn if loss_key is None else loss_key, donate)
        return self.get(
            key, lambda: make_train_step(graphdef, loss_fn, self.optimizer(opt), donate=donate)
        )

    def keys(self) -> list:
        return list(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def clear(self) -> None:
        self._items.clear()


#: The process-wide cache every trainer uses.
STEPS = StepCache()


# --------------------------------------------------------------------------------------------
# Stage runner
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class StageResult:
    """What `run_stage` returns.

    Attributes:
      state: the final `TrainState` (step == num_steps), on the stage's mesh.
      start_step: the step the run resumed from (0 for a fresh run).
      wall_seconds: wall time of this call (compilation included).
      compile_seconds: time from the start of the loop to the end of its first step (the
        compilation, mostly); None when no step ran.
    """

    state: TrainState
    start_step: int
    wall_seconds: float
    compile_seconds: float | None

    @property
    def steps_run(self) -> int:
        return int(self.state.step) - self.start_step


def _batch_placer(mesh, process_local: bool) -> Callable[[Any], Any]:
    """Places a global host batch on `mesh`: leading axis split over `data`, scalars replicated.

    With several processes, every process's iterator yields the same global batch and each
    feeds only its own contiguous share (`common.distributed.host_local_batch`).
    """
    n_data = mesh.shape[dist.DATA_AXIS]
    multi = process_local or jax.process_count() > 1
    sharded, whole = dist.batch_sharding(mesh), dist.replicated(mesh)

    def put(x):
        if np.ndim(x) == 0:
            return dist.replicate(x, mesh) if multi else jax.device_put(x, whole)
        if x.shape[0] % n_data:
            raise ValueError(
                f"batch dimension {x.shape[0]} is not divisible by the mesh's data axis "
                f"({n_data} devices): choose a batch size that is a multiple of {n_data}"
            )
        if multi:
            local = dist.host_local_batch(np.asarray(x))
            return jax.make_array_from_process_local_data(sharded, local)
        return jax.device_put(x, sharded)

    return lambda batch: jax.tree.map(put, batch)


def run_stage(
    name: str,
    state: TrainState,
    step_fn: Callable[[TrainState, Any], tuple[TrainState, dict]],
    data: DataIterator,
    num_steps: int,
    *,
    directory: Any = None,
    checkpoint_config: Any = None,
    ignore_config_keys: Any = (),
    max_to_keep: int | None = 1,
    save_every: int | None = None,
    eval_fn: Callable[[TrainState], Mapping[str, float]] | None = None,
    eval_every: int | None = None,
    log_every: int = 10,
    check_finite_every: int = 1,
    verbose: bool = True,
    mesh: Any = None,
    process_local: bool = False,
    placement: str = "data_parallel",
    metrics_writer: Any = None,
) -> StageResult:
    """One training stage: checkpoints, metrics, progress/ETA, the loop and the mesh.

    Every trainer of the three packages runs through here, so each gets the same resume,
    non-finite-loss stop, logging and data-parallel placement:

    - the state is replicated over `mesh` (default: `common.distributed.make_mesh()` over
      every device of every process) and each batch is split over its `data` axis, so the
      same call runs on one CPU, 8 GPUs or several hosts;
    - with `directory`, checkpoints go to `directory/checkpoints` (config-checked on
      restore: `checkpoint_config`, minus `ignore_config_keys`) and the metrics of every
      `log_every`-th step to `directory/metrics.jsonl`; a re-run resumes bit for bit;
    - `verbose` prints a steps/s + ETA line (`common.metrics.Progress`) to stderr.

    Args:
      name: the stage's name in progress lines.
      state, step_fn, data, num_steps, save_every, eval_fn, eval_every, log_every,
        check_finite_every: as for `train`.
      process_local: force the multi-process batch path (each process feeds its share)
        even with one process; tests use it to exercise that path.
      placement: "data_parallel" (the default above) or "as_given": the state and batches
        keep the shardings the caller gave them (a model whose weights are sharded over the
        devices, FSDP-style, with batches too small to split) and `mesh` is unused.
      metrics_writer: an object with `.write(step, metrics)` receiving the logged metrics
        when there is no `directory` (e.g. a caller's own log).

    Returns:
      a `StageResult`.
    """
    if placement not in ("data_parallel", "as_given"):
        raise ValueError(
            f"run_stage: placement must be 'data_parallel' or 'as_given', got {placement!r}"
        )
    t0 = time.perf_counter()
    place = None
    if placement == "data_parallel":
        mesh = dist.make_mesh() if mesh is None else mesh
        state = (
            dist.replicate(state, mesh)
            if jax.process_count() > 1
            else jax.device_put(state, dist.replicated(mesh))
        )
        place = _batch_placer(mesh, process_local)
    ckpt, writer = None, metrics_writer
    if directory is not None:
        directory = pathlib.Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        ckpt = Checkpointer(
            directory / "checkpoints",
            max_to_keep=max_to_keep,
            config=checkpoint_config,
            ignore_config_keys=list(ignore_config_keys),
        )
        # Only process 0 writes metrics: every process computes the same replicated values.
        if jax.process_index() == 0:
            writer = MetricsWriter(directory / "metrics.jsonl")
    start = (ckpt.latest_step() or 0) if ckpt is not None else int(state.step)
    progress = Progress(num_steps, name=name, start_step=start) if verbose else None
    first: list[float] = []

    def on_step(step, metrics):
        if not first:
            first.append(time.perf_counter() - t0)
        if progress is not None:
            progress.update(step, metrics)

    try:
        state = train(
            state,
            step_fn,
            data,
            num_steps,
            checkpointer=ckpt,
            save_every=save_every,
            eval_fn=eval_fn,
            eval_every=eval_every,
            metrics_writer=writer,
            log_every=log_every,
            progress=on_step,
            check_finite_every=check_finite_every,
            place_batch=place,
        )
    finally:
        if writer is not None and writer is not metrics_writer:
            writer.close()
        if ckpt is not None:
            ckpt.close()
    return StageResult(state, start, time.perf_counter() - t0, first[0] if first else None)
