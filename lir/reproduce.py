"""``python -m lir reproduce``: the Table 1 analogue, the latent-usage diagnostics (LIVR §4.4.1),
the stage-split / K / mask-variant / latent-placement-and-sharing ablations (Tables 3-4, when
``cfg.sweep.tasks`` is set), the multi-task Table 2 analogue (when
``cfg.sweep.multitask_seeds`` is set) and a latent->image attention plot, written as
``report.md`` + ``results.json`` (``common.report.Report``).

This module is the orchestration; the paper's numbers are in ``lir.paper`` and the report's
prose, tables and figure in ``lir.report``.

Resumable: phase P is cached (``lir.train.pretrain``) and every finished (task, arm, seed) run
is stored as ``<run_dir>/runs/<task>/<arm>/seed<s>.json`` through
``common.report.StageClock.cached``, which keeps the seconds each run took; a rerun of the
same command skips what is there (delete the folder to recompute) and its report still states
the compute time of every stage (pretrain, table1, ablations, table2, attention_plot).

``results.json`` holds ``table1`` = {task: {arm: mean test accuracy over seeds}} (fractions,
arms zero_shot / sft / livr / latents_only / mask_only [/ prompt_tuning]), ``table1_seeds``,
``table1_std``, ``paired`` (per-seed LIVR - SFT and sign tests), ``diagnostics``,
``ablations``, ``table2`` (multi-task: per method per-task and mean accuracy, per-seed
LIVR - SFT, sign test), ``headline`` (``common.report.Row`` s: ours vs the paper's
headline differences), ``pretrain``, ``compute`` (seconds per stage, cached stages included),
``paper`` (the paper's numbers in %), ``config``.
"""

from __future__ import annotations

import math
import pathlib
import time
from collections.abc import Callable

import numpy as np

from common.config import to_dict
from common.report import Report, StageClock, command_line, rows_json
from lir import evaluate as ev
from lir import paper as P
from lir import report as R
from lir import train as T
from lir.config import LIRConfig
from lir.tasks import NEGATIVE_CONTROL, TASKS

MAIN_ARMS = ("zero_shot", "sft", "livr", "latents_only", "mask_only", "prompt_tuning")


# --------------------------------------------------------------------------------------------
# Statistics
# --------------------------------------------------------------------------------------------


def sign_test(diffs) -> dict:
    """Two-sided exact binomial sign test of paired differences (ties dropped)."""
    d = np.asarray(list(diffs), float)
    wins, losses = int((d > 0).sum()), int((d < 0).sum())
    n = wins + losses
    if n == 0:
        p = 1.0
    else:
        k = min(wins, losses)
        p = min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2**n)
    return {"wins": wins, "losses": losses, "ties": int(len(d) - n), "p_value": p}


def _mean_std(xs) -> tuple[float, float]:
    a = np.asarray(xs, float)
    return float(a.mean()), float(a.std(ddof=1)) if len(a) > 1 else 0.0


# --------------------------------------------------------------------------------------------
# Runs (cached per file)
# --------------------------------------------------------------------------------------------


class Runner:
    """Runs and caches (task, arm, seed) results under ``run_dir/runs`` through ``clock``
    (each result file is read or computed once per invocation, so a run shared by two tables
    is counted once); task data is built once per (task, K)."""

    def __init__(
        self,
        cfg: LIRConfig,
        pretrained: T.Pretrained,
        run_dir: pathlib.Path,
        log: Callable[[str], None],
        clock: StageClock,
    ):
        self.cfg, self.pre, self.dir, self.log = cfg, pretrained, run_dir / "runs", log
        self.clock = clock
        self._data: dict = {}
        self._results: dict[pathlib.Path, dict] = {}

    def data(self, task: str, k: int, placement: str = "after_prompt") -> T.TaskData:
        key = (task, k, placement)
        if key not in self._data:
            if len(self._data) >= 6:  # bounded memory; the oldest entry goes
                self._data.pop(next(iter(self._data)))
            self._data[key] = T.task_data(self.cfg, task, k, placement)
        return self._data[key]

    def _cached(self, stage: str, path: pathlib.Path, compute: Callable[[], T.RunResult]) -> dict:
        if path not in self._results:
            self._results[path] = self.clock.cached(stage, path, lambda: compute().to_json())
        return self._results[path]

    def zero_shot(self, task: str) -> dict:
        path = self.dir / task / "zero_shot" / "seed0.json"
        return self._cached(
            "table1",
            path,
            lambda: T.zero_shot(self.cfg, self.pre, self.data(task, self.cfg.finetune.num_latents)),
        )

    def run(
        self,
        task: str,
        arm: T.Arm,
        seed: int,
        k: int | None = None,
        tag: str | None = None,
        stage: str = "table1",
    ) -> dict:
        k = self.cfg.finetune.num_latents if k is None else k
        path = self.dir / task / (tag or arm.name) / f"seed{seed}.json"

        def go():
            t0 = time.time()
            r = T.finetune(
                self.cfg,
                self.pre,
                self.data(task, k, arm.placement),
                arm,
                seed,
                metrics_dir=path.parent / f"seed{seed}",
            )
            self.log(
                f"{task:26s} {tag or arm.name:22s} seed {seed}: test "
                f"{r.test['accuracy']:.3f} (best epoch {r.best_epoch}, "
                f"{time.time() - t0:.0f} s)"
            )
            return r

        return self._cached(stage, path, go)

    def multitask(self, arm: T.Arm, seed: int) -> dict:
        """One multi-task run on the union of ``cfg.tasks`` (final checkpoint), with the test
        diagnostics of every task; cached like :meth:`run`."""
        path = self.dir / "_multitask" / arm.name / f"seed{seed}.json"

        def go():
            cfg, t0 = self.cfg, time.time()
            data = T.multitask_data(cfg, cfg.tasks)
            r, model = T.finetune(
                cfg,
                self.pre,
                data,
                arm,
                seed,
                select="final",
                metrics_dir=path.parent / f"seed{seed}",
                return_model=True,
            )
            per_task = {}
            for task in cfg.tasks:
                d = T.task_data(cfg, task)
                d = d if arm.latents else d.without_latents()
                per_task[task] = ev.diagnostics(model, d.test, cfg.finetune.eval_batch_size)
            r.test = {"all": r.test, **per_task}
            self.log(
                f"{'multi-task':26s} {arm.name:22s} seed {seed}: mean test "
                f"{np.mean([v['accuracy'] for v in per_task.values()]):.3f} "
                f"({time.time() - t0:.0f} s)"
            )
            return r

        return self._cached("table2", path, go)


# --------------------------------------------------------------------------------------------
# Reproduction
# --------------------------------------------------------------------------------------------


def reproduce(
    cfg: LIRConfig,
    run_dir: str | pathlib.Path,
    *,
    preset: str = "custom",
    verbose: bool = True,
    cache_root: str | pathlib.Path | None = None,
    command: str | None = None,
) -> dict:
    """Everything in the module docstring; returns the ``results`` dict of results.json.
    ``cache_root``: the phase-P cache (default ``run_dir/../lir_pretrain_cache``)."""
    run_dir = pathlib.Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    report = Report(f"lir: LIVR reproduction, preset `{preset}`", command=command or command_line())
    log = print if verbose else (lambda *_: None)
    cache_root = pathlib.Path(cache_root) if cache_root else run_dir.parent / "lir_pretrain_cache"
    clock = StageClock()

    t0 = time.perf_counter()
    pre = T.pretrain(cfg, cache_root, verbose=verbose)
    if pre.from_cache:  # the phase-P cache records what training it took
        clock.add("pretrain", pre.metrics.get("train_seconds", 0.0), cached=True)
    else:
        clock.add("pretrain", time.perf_counter() - t0)
    log(f"phase P ready ({pre.directory}); held-out skill accuracy {pre.metrics['skill_accuracy']}")
    runner = Runner(cfg, pre, run_dir, log, clock)
    specs = T.arm_specs(cfg)

    # ---- Table 1 analogue --------------------------------------------------------------
    raw: dict[str, dict[str, list[dict]]] = {t: {a: [] for a in cfg.arms} for t in cfg.tasks}
    for task in cfg.tasks:
        raw[task]["zero_shot"] = [runner.zero_shot(task)]
    # seeds outermost: an interrupted run already holds every task at the first seeds, and
    # `--set seeds=(...)` with the finished seeds reports them from the cache
    for s in cfg.seeds:
        for task in cfg.tasks:
            for arm in cfg.arms:
                raw[task][arm].append(runner.run(task, specs[arm], s))
    arms_run = ("zero_shot",) + tuple(cfg.arms)
    table1 = {
        t: {a: _mean_std([r["test"]["accuracy"] for r in raw[t][a]])[0] for a in arms_run}
        for t in cfg.tasks
    }
    table1_std = {
        t: {a: _mean_std([r["test"]["accuracy"] for r in raw[t][a]])[1] for a in arms_run}
        for t in cfg.tasks
    }
    table1_seeds = {
        t: {a: [r["test"]["accuracy"] for r in raw[t][a]] for a in arms_run} for t in cfg.tasks
    }
    best_epochs = {
        t: {a: [r["best_epoch"] for r in raw[t][a]] for a in cfg.arms} for t in cfg.tasks
    }
    paired = _paired(cfg, table1_seeds)
    diagnostics = _diagnostics(cfg, raw)

    # ---- ablations and multi-task (small / paper presets) ------------------------------
    ablations = _ablations(cfg, runner, raw)
    multitask = _multitask(cfg, runner, table1)

    # ---- attention plot ----------------------------------------------------------------
    plot = _attention_plot(cfg, pre, runner, run_dir)

    results = {
        "preset": preset,
        "table1": table1,
        "table1_std": table1_std,
        "table1_seeds": table1_seeds,
        "best_epochs": best_epochs,
        "chance": {t: TASKS[t].chance for t in cfg.tasks},
        "paired": paired,
        "diagnostics": diagnostics,
        "ablations": ablations,
        "table2": multitask,
        "pretrain": {"directory": str(pre.directory), **pre.metrics},
        "compute": clock.to_json(),
        "runs": raw,
        "attention_plot": plot,
        "paper": {
            "table1": P.PAPER_TABLE1,
            "table1_backbone_shown": P.PAPER_BACKBONE,
            "stage_split": P.PAPER_STAGE_SPLIT,
            "num_latents": P.PAPER_K,
            "mask_variants": P.PAPER_MASKS,
            "latent_design": P.PAPER_LATENT_DESIGN,
            "table2": P.PAPER_TABLE2,
            "diagnostics_localization": P.PAPER_DIAGNOSTICS,
        },
        "config": to_dict(cfg),
    }
    results["headline"] = rows_json(R.headline_rows(cfg, results))
    R.write_report(report, cfg, preset, results)
    report.write(run_dir, results, clock=clock)
    log(
        f"wrote {run_dir / 'report.md'} and {run_dir / 'results.json'} "
        f"({time.time() - t_start:.0f} s)"
    )
    return results


def _paired(cfg: LIRConfig, seeds: dict) -> dict:
    """Per-seed paired differences vs SFT (and LIVR vs mask-only), with sign tests over every
    task x seed pair and over the relational tasks (all but the negative control)."""
    out = {}
    pairs = [
        ("livr", "sft"),
        ("latents_only", "sft"),
        ("mask_only", "sft"),
        ("livr", "latents_only"),
        ("livr", "mask_only"),
    ]
    for a, b in pairs:
        if a not in cfg.arms or b not in cfg.arms:
            continue
        per_task = {t: list(np.subtract(seeds[t][a], seeds[t][b])) for t in cfg.tasks}
        all_d = [d for t in cfg.tasks for d in per_task[t]]
        rel_d = [d for t in cfg.tasks if t != NEGATIVE_CONTROL for d in per_task[t]]
        out[f"{a}-{b}"] = {
            "per_task_seed": per_task,
            "per_task_mean": {t: float(np.mean(v)) for t, v in per_task.items()},
            "mean": float(np.mean(all_d)),
            "sign_test": sign_test(all_d),
            "sign_test_relational": sign_test(rel_d),
        }
    return out


def _diagnostics(cfg: LIRConfig, raw: dict) -> dict:
    """Per task and arm, the mean over seeds of every ``lir.evaluate`` diagnostic; plus the
    mean over tasks ("all")."""
    arms_run = ("zero_shot",) + tuple(cfg.arms)
    keys = R.DIAG_KEYS
    out = {
        t: {
            a: {k: float(np.mean([r["test"][k] for r in raw[t][a]])) for k in keys}
            for a in arms_run
        }
        for t in cfg.tasks
    }
    out["all"] = {
        a: {k: float(np.mean([out[t][a][k] for t in cfg.tasks])) for k in keys} for a in arms_run
    }
    return out


def _ablations(cfg: LIRConfig, runner: Runner, raw: dict) -> dict:
    """Stage split, K and stage-1 mask-variant sweeps on ``cfg.sweep.tasks`` (LIVR arms;
    mean test accuracy over ``cfg.sweep.seeds``). Runs that equal a Table-1 run are reused."""
    sw, ft = cfg.sweep, cfg.finetune
    if not sw.tasks:
        return {}
    out = {
        "stage_split": {},
        "num_latents": {},
        "mask_variants": {},
        "latent_design": {},
        "seeds": list(sw.seeds),
    }
    default_k = ft.num_latents

    def livr_runs(task, arm, k=None, tag=None):
        if tag is None and task in raw and "livr" in raw[task]:
            by_seed = {r["seed"]: r for r in raw[task]["livr"]}
            if all(s in by_seed for s in sw.seeds):
                return [by_seed[s] for s in sw.seeds]
        return [runner.run(task, arm, s, k=k, tag=tag, stage="ablations") for s in sw.seeds]

    def acc(runs):
        return _mean_std([r["test"]["accuracy"] for r in runs])

    for task in sw.tasks:
        split = {}
        for s1 in sw.stage1_epochs:
            default = s1 == ft.stage1_epochs
            arm = T.livr_arm(cfg, s1, name="livr" if default else None)
            split[s1] = acc(livr_runs(task, arm, tag=None if default else arm.name))
        out["stage_split"][task] = split
        ks = {}
        for k in sw.num_latents:
            default = k == default_k
            ks[k] = acc(
                livr_runs(
                    task, T.livr_arm(cfg, name="livr"), k=k, tag=None if default else f"livr_k{k}"
                )
            )
        out["num_latents"][task] = ks
        masks = {"bottleneck": acc(livr_runs(task, T.livr_arm(cfg, name="livr")))}
        for v in sw.mask_variants:
            arm = T.livr_arm(cfg, variant=v, name=f"livr_mask_{v}")
            masks[v] = acc(livr_runs(task, arm, tag=arm.name))
        out["mask_variants"][task] = masks
        designs = {"after_prompt_unshared": masks["bottleneck"]}
        for design in sw.latent_designs:
            arm = T.livr_arm(
                cfg,
                name=f"livr_{design}",
                placement="before_prompt" if design == "before_prompt" else "after_prompt",
                shared_latents=design == "shared",
            )
            designs[design] = acc(livr_runs(task, arm, tag=arm.name))
        out["latent_design"][task] = designs
    return out


def _multitask(cfg: LIRConfig, runner: Runner, table1: dict) -> dict:
    """Table 2 analogue: multi-task SFT vs LIVR (final checkpoints) over
    ``cfg.sweep.multitask_seeds``; per task and mean test accuracy, the paired per-seed
    LIVR - SFT of the task means, and the single-task zero-shot for reference."""
    seeds = cfg.sweep.multitask_seeds
    if not seeds:
        return {}
    arms = T.multitask_arms(cfg)
    runs = {name: [runner.multitask(arm, s) for s in seeds] for name, arm in arms.items()}
    out: dict = {"seeds": list(seeds), "tasks": list(cfg.tasks)}
    for name, rs in runs.items():
        per_seed = {t: [r["test"][t]["accuracy"] for r in rs] for t in cfg.tasks}
        means = [float(np.mean([per_seed[t][i] for t in cfg.tasks])) for i in range(len(rs))]
        out[name] = {
            "per_task": {t: _mean_std(v)[0] for t, v in per_seed.items()},
            "per_task_seeds": per_seed,
            "mean_seeds": means,
            "mean": float(np.mean(means)),
            "train_seconds": [r["train_seconds"] for r in rs],
        }
    out["zero_shot"] = {
        "per_task": {t: table1[t]["zero_shot"] for t in cfg.tasks},
        "mean": float(np.mean([table1[t]["zero_shot"] for t in cfg.tasks])),
    }
    out["livr-sft"] = {
        "per_seed": list(np.subtract(out["livr"]["mean_seeds"], out["sft"]["mean_seeds"])),
        "sign_test": sign_test(
            [
                d
                for t in cfg.tasks
                for d in np.subtract(
                    out["livr"]["per_task_seeds"][t], out["sft"]["per_task_seeds"][t]
                )
            ]
        ),
    }
    return out


def _attention_plot(
    cfg: LIRConfig, pre: T.Pretrained, runner: Runner, run_dir: pathlib.Path
) -> str | None:
    """Latent->image attention of the seed-0 LIVR model of the first relational task on four
    test examples (retrained deterministically if only its JSON was cached). The figure's
    compute time is kept in ``runs/attention_plot.json`` beside it."""
    if "livr" not in cfg.arms or not cfg.tasks:
        return None
    task = next((t for t in cfg.tasks if t != NEGATIVE_CONTROL), cfg.tasks[0])
    name = f"latent_attention_{task}.png"
    record = runner.dir / "attention_plot.json"
    if not (run_dir / name).exists():
        record.unlink(missing_ok=True)  # the figure is gone: draw it again

    def draw() -> dict:
        data = runner.data(task, cfg.finetune.num_latents)
        _, model = T.finetune(
            cfg, pre, data, T.arm_specs(cfg)["livr"], cfg.seeds[0], return_model=True
        )
        R.plot_latent_attention(
            model,
            T.take_rows(data.test, 4),
            run_dir / name,
            title=f"LIVR latent->image attention, {task}",
        )
        return {"figure": name, "task": task, "seed": cfg.seeds[0]}

    return runner.clock.cached("attention_plot", record, draw)["figure"]
