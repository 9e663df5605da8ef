"""Phase P (pretraining, cached) and phase F (LoRA / LIVR fine-tuning arms) for lir.

Phase P (docs/lir.md D14): the whole tiny LMM (every ``nnx.Param`` except latents and LoRA,
``PRETRAIN_FILTER``) is trained once on the generic single-image QA mixture of
``lir/tasks/pretrain.py`` with ``common.train.train``. The result is cached on disk under
``<cache_root>/<hash>/`` where the hash covers exactly the config sections it depends on
(:func:`pretrain_key`), so every task, arm and seed -- and every later run with the same
model/data/pretrain settings -- reuses it; an interrupted pretraining resumes from its
``common.checkpoint.Checkpointer``.

Phase F (LIVR §3.2-3.3, docs/lir.md D17): for one (task, arm, seed) the pretrained weights
are loaded into a fresh LMM with K latent rows (re-drawn around the mean embedding,
docs/lir.md D2), LoRA is added to the LM, and only the arm's trainable filter is optimized.
Each stage gets a fresh AdamW and warmup-cosine schedule (``lir.config.stage_optimizer`` of
``finetune.optim``, or ``finetune.prompt_tuning_optim`` for prompt tuning; docs/lir.md D5). Validation accuracy is measured after every epoch and the best eligible
epoch's params are kept in memory (docs/lir.md D6: for two-stage arms only stage-2 epochs are
eligible; ties go to the later epoch).

Arms (:data:`ARMS`; K = the run's ``finetune.num_latents`` unless stated):

=================== ====== ====================================== =======================
arm                 K      stages (mask variant x epochs)         trained
=================== ====== ====================================== =======================
``zero_shot``       --     none (the phase-P model)               nothing
``sft``             0      causal x sft_epochs                    LoRA
``livr``            K      bottleneck x s1, causal x s2           LoRA + latents
``latents_only``    K      causal x sft_epochs                    LoRA + latents
``mask_only``       0      answer_only x s1, causal x s2          LoRA
``prompt_tuning``   K      causal x sft_epochs (its own optim)    latents only
=================== ====== ====================================== =======================

Ablation arms are built with :func:`livr_arm` (stage split, stage-1 mask variant) and the
``num_latents`` argument of :func:`finetune` (K sweep).

Every arm uses one batch layout with K latent slots; arms without latents (K = 0) run on
``lir.data.drop_latents`` of the same batches (latent slots become PAD), which equals deleting
the latents (positions do not depend on K; tested in tests/lir/test_model.py). So all arms
have one sequence length, and every distinct (trainable filter, mask variant, schedule) train
step is compiled once and reused across tasks and seeds (``common.train.STEPS``, keyed by
the graphdef, the stage's optimizer config and ``("lir.finetune", trainable, variant)``).

Both phases run through ``common.train.run_stage``: the state is replicated over the device
mesh (all devices by default) and every batch is split over its ``data`` axis, so a batch size
must be divisible by the device count.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import pathlib
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from common.config import to_dict
from common.data import ArrayIterator
from common.metrics import MetricsWriter
from common.rng import stream_key, stream_seed
from common.train import (
    STEPS,
    OptimizerConfig,
    TrainState,
    create_train_state,
    merge_model,
    run_stage,
)
from lir import evaluate as ev
from lir.config import LIRConfig, layout, model_config, stage_optimizer, steps_per_epoch
from lir.data import Batch, collate, drop_latents, take
from lir.model import (
    LATENT_FILTER,
    LIVR_FILTER,
    LMM,
    LORA_FILTER,
    PRETRAIN_FILTER,
    add_lora,
    loss_fn,
    reset_latents,
)
from lir.tasks import PRETRAIN_NAMES, generate

# Bump when phase-P code changes in a way that makes old cached models invalid.
# 2: named RNG streams (common.rng) and the nested pretrain.optim section.
PRETRAIN_VERSION = 2
# Random sources are named streams (common.rng.stream_seed) of cfg.seed (phase P, task data)
# or of the run seed (phase F: latents, LoRA, step keys, example order), so they stay
# independent of each other and of the seed values.

FILTERS = {"lora": LORA_FILTER, "livr": LIVR_FILTER, "latents": LATENT_FILTER}


# --------------------------------------------------------------------------------------------
# Arms
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Arm:
    """A fine-tuning recipe. ``stages``: ((mask variant, epochs), ...), run in order, each with
    a fresh optimizer; ``trainable``: a key of :data:`FILTERS`; ``latents``: whether the K
    latent slots are in the input; ``optim``: the FinetuneConfig field holding the arm's
    optimizer, "optim" or "prompt_tuning_optim"; ``placement``: a
    ``lir.data.LATENT_PLACEMENTS`` entry (the data must be collated with it);
    ``shared_latents``: one latent row repeated K times."""

    name: str
    stages: tuple[tuple[str, int], ...]
    trainable: str
    latents: bool
    optim: str = "optim"
    # latent-design ablations (LIVR §4.4.3): where the K slots sit, and one shared row
    placement: str = "after_prompt"
    shared_latents: bool = False

    @property
    def epochs(self) -> int:
        return sum(e for _, e in self.stages)

    def eligible_stage(self) -> int:
        """Index of the stage whose epochs compete for best-val (the last non-empty one)."""
        return max(i for i, (_, e) in enumerate(self.stages) if e > 0)


def livr_arm(
    cfg: LIRConfig,
    stage1_epochs: int | None = None,
    variant: str = "bottleneck",
    name: str | None = None,
    *,
    placement: str = "after_prompt",
    shared_latents: bool = False,
) -> Arm:
    """LIVR with ``stage1_epochs`` of the ``variant`` mask then causal for the rest of
    ``sft_epochs`` (stage1_epochs 0 = latents only)."""
    ft = cfg.finetune
    s1 = ft.stage1_epochs if stage1_epochs is None else stage1_epochs
    if not 0 <= s1 <= ft.sft_epochs:
        raise ValueError(f"stage1_epochs must be in [0, {ft.sft_epochs}]; got {s1}")
    stages = tuple(s for s in ((variant, s1), ("causal", ft.sft_epochs - s1)) if s[1] > 0)
    return Arm(
        name or f"livr_s1_{s1}",
        stages,
        "livr",
        True,
        placement=placement,
        shared_latents=shared_latents,
    )


def multitask_arms(cfg: LIRConfig) -> dict[str, Arm]:
    """Table 2 arms (LIVR §4.3): SFT for ``multitask_sft_epochs`` vs LIVR for
    ``multitask_stage1_epochs`` + ``multitask_stage2_epochs`` on the union of the tasks."""
    ft = cfg.finetune
    return {
        "sft": Arm("multitask_sft", (("causal", ft.multitask_sft_epochs),), "lora", False),
        "livr": Arm(
            "multitask_livr",
            (("bottleneck", ft.multitask_stage1_epochs), ("causal", ft.multitask_stage2_epochs)),
            "livr",
            True,
        ),
    }


def arm_specs(cfg: LIRConfig) -> dict[str, Arm]:
    """The main arms of :func:`finetune` (module docstring table) for ``cfg``."""
    ft = cfg.finetune
    return {
        "sft": Arm("sft", (("causal", ft.sft_epochs),), "lora", False),
        "livr": livr_arm(cfg, name="livr"),
        "latents_only": Arm("latents_only", (("causal", ft.sft_epochs),), "livr", True),
        # LIVR §4.4.2 "mask only": K = 0, answer (and template tail) blocked from the image in
        # stage 1 while the prompt still sees it; same epoch split as LIVR
        "mask_only": Arm(
            "mask_only",
            (("answer_only", ft.stage1_epochs), ("causal", ft.stage2_epochs)),
            "lora",
            False,
        ),
        "prompt_tuning": Arm(
            "prompt_tuning",
            (("causal", ft.sft_epochs),),
            "latents",
            True,
            optim="prompt_tuning_optim",
        ),
    }


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TaskData:
    """Collated splits of one task at the run's layout (K = ``num_latents`` slots)."""

    task: str
    train: Batch
    val: Batch
    test: Batch
    num_latents: int

    def without_latents(self) -> TaskData:
        return dataclasses.replace(
            self,
            train=drop_latents(self.train),
            val=drop_latents(self.val),
            test=drop_latents(self.test),
        )


def task_data(
    cfg: LIRConfig, task: str, num_latents: int | None = None, placement: str = "after_prompt"
) -> TaskData:
    """Train / val (offset stream of the train generator) / test (shifted generator) splits of
    ``task``, fixed by ``cfg.seed`` (the run seed varies init and order, not the data), with
    the latent slots at ``placement``."""
    k = cfg.finetune.num_latents if num_latents is None else num_latents
    lay = layout(cfg, k, latent_placement=placement)
    d = cfg.data
    seed = stream_seed(cfg.seed, "task_data")
    gen = lambda n, split, offset: generate(task, n, seed, split, d.image_size, offset)  # noqa: E731
    return TaskData(
        task,
        collate(gen(d.n_train, "train", 0), lay),
        collate(gen(d.n_val, "train", 1), lay),
        collate(gen(d.n_test, "test", 0), lay),
        k,
    )


def concat_batches(batches: Sequence[Batch]) -> Batch:
    """Row-wise union of collated splits that share one layout (same sequence length)."""
    lengths = {b.tokens.shape[1] for b in batches}
    if len(lengths) != 1:
        raise ValueError(f"batches must share one layout; got sequence lengths {sorted(lengths)}")
    return Batch(*(np.concatenate(fields) for fields in zip(*batches, strict=True)))


def multitask_data(
    cfg: LIRConfig, tasks: Sequence[str], num_latents: int | None = None
) -> TaskData:
    """The union of the tasks' train / val / test splits (docs/lir.md D12: a uniform shuffle of
    the union, task identity only through the prompt). Every task is collated at the run's full
    layout, so single-image tasks carry padded image slots."""
    parts = [task_data(cfg, t, num_latents) for t in tasks]
    return TaskData(
        "+".join(tasks),
        concat_batches([p.train for p in parts]),
        concat_batches([p.val for p in parts]),
        concat_batches([p.test for p in parts]),
        parts[0].num_latents,
    )


def _as_arrays(batch: Batch) -> dict[str, np.ndarray]:
    return batch._asdict()


def _batch_loss(variant: str) -> Callable:
    """``loss_fn(variant)`` over the dict batches of ``common.data.ArrayIterator``."""
    inner = loss_fn(variant)

    def fn(model, batch, key):
        return inner(model, Batch(**batch), key)

    return fn


def finetune_step(graphdef, trainable: str, variant: str, opt: OptimizerConfig):
    """The jitted phase-F ``step(state, batch)`` for (graphdef, trainable filter name, mask
    variant, optimizer config), built once in ``common.train.STEPS`` and reused by every task,
    seed and arm with that key."""
    return STEPS.train_step(
        graphdef, opt, _batch_loss(variant), loss_key=("lir.finetune", trainable, variant)
    )


def finetune_step_keys() -> list[tuple[str, str]]:
    """(trainable, mask variant) of every phase-F step currently in ``STEPS``."""
    return [
        k[3][1:]
        for k in STEPS.keys()
        if k[0] == "train_step" and isinstance(k[3], tuple) and k[3][0] == "lir.finetune"
    ]


class _LazyIterator:
    """A ``common.data.DataIterator`` that builds its data only when a batch is first asked
    for, so loading a finished phase-P cache (which restores the iterator position but reads
    no batch) does not generate the pretraining mixture."""

    def __init__(self, build: Callable[[], ArrayIterator]):
        self._build, self._it, self._state = build, None, None

    def _get(self) -> ArrayIterator:
        if self._it is None:
            self._it = self._build()
            if self._state is not None:
                self._it.set_state(self._state)
        return self._it

    def next(self) -> Any:
        return self._get().next()

    def get_state(self) -> dict:
        if self._it is not None:
            return self._it.get_state()
        return self._state if self._state is not None else {"epoch": 0, "position": 0}

    def set_state(self, state: dict) -> None:
        if self._it is not None:
            self._it.set_state(state)
        else:
            self._state = dict(state)


# --------------------------------------------------------------------------------------------
# Phase P
# --------------------------------------------------------------------------------------------


def pretrain_sections(cfg: LIRConfig) -> dict:
    """The config values phase P depends on (and nothing else): model shape (minus the
    latent table, which phase P does not train), data layout, pretrain settings, seed."""
    d = to_dict(cfg)
    model = {k: v for k, v in d["model"].items() if k not in ("num_latents", "latent_init_std")}
    data = {k: d["data"][k] for k in ("image_size", "max_prompt_len", "max_images", "max_latents")}
    return {
        "version": PRETRAIN_VERSION,
        "seed": cfg.seed,
        "model": model,
        "data": data,
        "pretrain": d["pretrain"],
    }


def pretrain_key(cfg: LIRConfig) -> str:
    """Hash of :func:`pretrain_sections` naming the cache directory."""
    text = json.dumps(pretrain_sections(cfg), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclasses.dataclass
class Pretrained:
    """A phase-P model: ``params`` (host NumPy ``nnx.State`` of the PRETRAIN_FILTER params),
    ``metrics`` (held-out accuracy per skill, wall time), ``directory``; ``from_cache``: loaded
    from a finished cache, no step run."""

    params: nnx.State
    metrics: dict
    directory: pathlib.Path
    from_cache: bool = False


def pretrain_data(cfg: LIRConfig, n: int, stream: str = "data", split: str = "train") -> Batch:
    """``n`` examples of the phase-P mixture, equal counts per skill, at the K = 0 layout,
    drawn from the named stream ``("pretrain", stream)`` of ``cfg.seed``."""
    per = max(n // len(PRETRAIN_NAMES), 1)
    recs = []
    for name in PRETRAIN_NAMES:
        recs += generate(
            name, per, stream_seed(cfg.seed, "pretrain", stream), split, cfg.data.image_size
        )
    return collate(recs, layout(cfg, 0))


def _pretrain_model(cfg: LIRConfig) -> LMM:
    # one (unused, untrained) latent row: orbax cannot save a zero-size array
    return LMM(model_config(cfg, 1), rngs=nnx.Rngs(stream_seed(cfg.seed, "pretrain", "model")))


def pretrain(
    cfg: LIRConfig,
    cache_root: str | pathlib.Path,
    *,
    verbose: bool = True,
    eval_per_skill: int = 200,
) -> Pretrained:
    """Phase P, cached under ``cache_root/<pretrain_key(cfg)>``; a finished cache is loaded
    without training (``common.train.run_stage`` restores its final checkpoint and runs no
    step), an unfinished one resumes from its last checkpoint."""
    t0 = time.time()
    p = cfg.pretrain
    directory = pathlib.Path(cache_root) / pretrain_key(cfg)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "sections.json").write_text(json.dumps(pretrain_sections(cfg), indent=1))
    graphdef, state = create_train_state(
        _pretrain_model(cfg),
        STEPS.optimizer(p.optim),
        stream_seed(cfg.seed, "pretrain", "steps"),
        trainable=PRETRAIN_FILTER,
    )
    step_fn = STEPS.train_step(
        graphdef, p.optim, _batch_loss("causal"), loss_key=("lir.pretrain", "causal")
    )
    data = _LazyIterator(
        lambda: ArrayIterator(
            _as_arrays(pretrain_data(cfg, p.n_examples)),
            p.batch_size,
            seed=stream_seed(cfg.seed, "pretrain", "order"),
        )
    )
    done = directory / "done.json"
    result = run_stage(
        "pretrain",
        state,
        step_fn,
        data,
        p.calls,
        directory=directory,
        checkpoint_config=pretrain_sections(cfg),
        max_to_keep=1,
        save_every=max(p.calls // 4, 1),
        log_every=max(p.calls // 20, 1),
        check_finite_every=50,
        verbose=verbose,
    )
    state = result.state
    from_cache = done.exists() and result.steps_run == 0
    if from_cache:
        metrics = json.loads(done.read_text())
    else:
        metrics = {
            "train_seconds": time.time() - t0,
            "steps": p.optim.total_steps,
            "skill_accuracy": _skill_accuracy(cfg, graphdef, state, eval_per_skill),
        }
        done.write_text(json.dumps(metrics, indent=1))
    params = jax.tree.map(np.asarray, state.params)
    return Pretrained(params, metrics, directory, from_cache)


def _skill_accuracy(cfg, graphdef, state: TrainState, n: int) -> dict[str, float]:
    """Held-out accuracy of the phase-P model on each skill (docs/lir.md D18: check > 80%);
    ``n`` = 0 skips it."""
    if n < 1:
        return {}
    model = merge_model(graphdef, state)
    out = {}
    for name in PRETRAIN_NAMES:
        recs = generate(
            name, n, stream_seed(cfg.seed, "pretrain", "eval"), "test", cfg.data.image_size
        )
        out[name] = ev.accuracy(model, collate(recs, layout(cfg, 0)), cfg.finetune.eval_batch_size)
    return out


# --------------------------------------------------------------------------------------------
# Phase F
# --------------------------------------------------------------------------------------------


def _fresh(tree):
    # New device buffers: train steps donate their state, and the cached pretrained params
    # must survive every run.
    return jax.tree.map(lambda x: jnp.array(x, copy=True), tree)


def finetune_model(
    cfg: LIRConfig,
    pretrained: Pretrained,
    seed: int,
    num_latents: int | None = None,
    shared_latents: bool = False,
) -> LMM:
    """The phase-P model with K fresh latent rows (mean embedding + std noise; one row repeated
    K times when ``shared_latents``) and LoRA on the LM (B = 0, so it starts equal to the
    phase-P model), seeded by ``seed``."""
    k = cfg.finetune.num_latents if num_latents is None else num_latents
    mcfg = dataclasses.replace(model_config(cfg, k), shared_latents=shared_latents)
    model = LMM(mcfg, rngs=nnx.Rngs(stream_seed(seed, "finetune", "model")))
    nnx.update(model, _fresh(pretrained.params))
    if k:
        reset_latents(model, stream_key(seed, "finetune", "latents"), cfg.finetune.latent_init_std)
    add_lora(model, cfg.finetune.lora, rngs=nnx.Rngs(stream_seed(seed, "finetune", "lora")))
    return model


@dataclasses.dataclass
class RunResult:
    """One (task, arm, seed) run: per-epoch validation accuracy, the selected epoch, test
    diagnostics (``lir.evaluate.diagnostics``), timing."""

    task: str
    arm: str
    seed: int
    num_latents: int
    val_curve: list[float]
    best_epoch: int
    best_val: float
    test: dict
    train_seconds: float
    train_steps: int

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


SELECTIONS = ("best_val", "final")


def finetune(
    cfg: LIRConfig,
    pretrained: Pretrained,
    data: TaskData,
    arm: Arm,
    seed: int,
    *,
    metrics_dir: str | pathlib.Path | None = None,
    return_model: bool = False,
    select: str = "best_val",
):
    """Phase F for one (task, arm, seed); returns a :class:`RunResult` (and the selected model
    when ``return_model``). ``data`` must have K slots at ``arm.placement``; the arm decides
    whether they are used. ``select``: "best_val" (single-task: the best eligible epoch) or
    "final" (multi-task, LIVR §4.3: the last epoch). ``metrics_dir``: where
    ``metrics.jsonl`` gets one line per epoch (stage index, epoch, validation accuracy).
    Each stage runs through ``common.train.run_stage`` on the default mesh (all devices), so
    ``finetune.batch_size`` must be divisible by the device count."""
    if select not in SELECTIONS:
        raise ValueError(f"select must be one of {SELECTIONS}; got {select!r}")
    ft = cfg.finetune
    k = data.num_latents if arm.latents else 0
    if not arm.latents:
        data = data.without_latents()
    model = finetune_model(cfg, pretrained, seed, data.num_latents, arm.shared_latents)
    spe = steps_per_epoch(ft, data.train.batch_size)
    if spe < 1:
        raise ValueError(
            f"n_train={data.train.batch_size} gives no full batch of "
            f"{ft.batch_size * ft.accumulation_steps}"
        )
    arm_optim = getattr(ft, arm.optim)
    calls_per_epoch = spe * ft.accumulation_steps
    best = {"val": -1.0, "epoch": -1, "params": None}
    curve: list[float] = []
    epoch0, steps_done, t0 = 0, 0, time.time()
    # Only the per-epoch validation accuracy is logged: phase F keeps no checkpoints (a run
    # is cheap and its result is cached whole by lir.reproduce), so run_stage gets no
    # directory and writes no train-step metrics.
    writer = MetricsWriter(pathlib.Path(metrics_dir) / "metrics.jsonl") if metrics_dir else None
    try:
        for si, (variant, epochs) in enumerate(arm.stages):
            if epochs == 0:
                continue
            opt = stage_optimizer(ft, epochs * spe, arm_optim)
            gd, state = create_train_state(
                model,
                STEPS.optimizer(opt),
                stream_seed(seed, "finetune", "steps", si),
                trainable=FILTERS[arm.trainable],
            )
            it = ArrayIterator(
                _as_arrays(data.train), ft.batch_size, seed=stream_seed(seed, "finetune", "order")
            )
            # same epoch order as a one-stage run: stage 2 continues at epoch `epoch0`
            it.set_state({"epoch": epoch0, "position": 0})
            eligible = si == arm.eligible_stage()

            def on_epoch(st, _gd=gd, _eligible=eligible, _si=si, _done=steps_done):
                acc = ev.accuracy(merge_model(_gd, st), data.val, ft.eval_batch_size)
                curve.append(acc)
                # ties -> later epoch (docs/lir.md D6); "final" keeps every epoch, so the last wins
                if _eligible and (acc >= best["val"] or select == "final"):
                    best.update(val=acc, epoch=len(curve), params=jax.tree.map(jnp.copy, st.params))
                if writer is not None:
                    writer.write(
                        _done + int(st.step),
                        {"epoch": len(curve), "stage": _si, "eval/val_accuracy": acc},
                    )
                return {"val_accuracy": acc}

            state = run_stage(
                f"{arm.name}:{variant}",
                state,
                finetune_step(gd, arm.trainable, variant, opt),
                it,
                epochs * calls_per_epoch,
                eval_fn=on_epoch,
                eval_every=calls_per_epoch,
                log_every=calls_per_epoch,
                check_finite_every=calls_per_epoch,
                verbose=False,
            ).state
            nnx.update(model, state.params, state.frozen)
            if eligible:
                nnx.update(model, best["params"])
            epoch0 += epochs
            steps_done += epochs * calls_per_epoch
    finally:
        if writer is not None:
            writer.close()
    seconds = time.time() - t0
    test = ev.diagnostics(model, data.test, ft.eval_batch_size)
    result = RunResult(
        data.task, arm.name, seed, k, curve, best["epoch"], best["val"], test, seconds, steps_done
    )
    return (result, model) if return_model else result


def zero_shot(cfg: LIRConfig, pretrained: Pretrained, data: TaskData) -> RunResult:
    """The phase-P model on the task's test set, no training (no latents in the input)."""
    model = finetune_model(cfg, pretrained, 0, data.num_latents)
    d = data.without_latents()
    test = ev.diagnostics(model, d.test, cfg.finetune.eval_batch_size)
    val = ev.accuracy(model, d.val, cfg.finetune.eval_batch_size)
    return RunResult(data.task, "zero_shot", 0, 0, [], 0, val, test, 0.0, 0)


def frozen_params(model: LMM) -> dict[str, np.ndarray]:
    """Flat path -> array of every param no phase-F arm may change (ViT, projector, LM base
    weights, embeddings: ``PRETRAIN_FILTER``), with LoRA wrappers' ``base`` level removed so
    the paths equal those of :attr:`Pretrained.params`. For tests and audits."""
    state = nnx.state(model, PRETRAIN_FILTER)
    return {
        "/".join(str(k) for k in p if k != "base"): np.asarray(v)
        for p, v in nnx.to_flat_state(state)
    }


def take_rows(data: Batch, n: int) -> Batch:
    """The first ``n`` rows of a collated split."""
    return take(data, np.arange(min(n, data.batch_size)))


def run_seeds(
    cfg: LIRConfig, pretrained: Pretrained, data: TaskData, arm: Arm, seeds: Sequence[int]
) -> list[RunResult]:
    """:func:`finetune` for each seed."""
    return [finetune(cfg, pretrained, data, arm, s) for s in seeds]
