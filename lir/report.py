"""The lir reproduction report: prose, tables and plots of ``lir.reproduce``'s results.

:func:`write_report` turns the ``results`` dict (see ``lir.reproduce``) into the sections of a
``common.report.Report``: our numbers beside the paper's (``lir.paper``), the headline
paper-vs-ours comparisons as ``common.report.Row`` s (:func:`headline_rows`), and the
analysis. :func:`plot_latent_attention` draws the latent->image attention figure.
"""

from __future__ import annotations

import math
import os

import numpy as np

from common.report import Report, Row, figure, savefig
from lir.config import LIRConfig
from lir.evaluate import latent_image_attention
from lir.paper import (
    ABL_TASKS,
    PAPER_BACKBONE,
    PAPER_DIAGNOSTICS,
    PAPER_K,
    PAPER_LATENT_DESIGN,
    PAPER_MASKS,
    PAPER_STAGE_SPLIT,
    PAPER_TABLE1,
    PAPER_TABLE2,
)

#: The latent-usage diagnostics of ``lir.evaluate.diagnostics`` that the paper reports.
DIAG_KEYS = tuple(PAPER_DIAGNOSTICS)


def _pct(x):
    return None if x is None else 100.0 * x


def paper_gain(
    backbone: str, a: str = "livr", b: str = "sft", tasks: tuple[str, ...] | None = None
) -> float:
    """The paper's mean ``a`` - ``b`` accuracy difference (points) over ``tasks`` (default:
    every task where the backbone reports both), from LIVR Tables 1 and 3."""
    rows = PAPER_TABLE1[backbone]
    tasks = tasks or tuple(t for t, v in rows.items() if a in v and b in v)
    return float(np.mean([rows[t][a] - rows[t][b] for t in tasks]))


def paper_gain_range() -> tuple[float, float]:
    """Smallest and largest mean LIVR - SFT gain over the backbones of LIVR Table 1."""
    gains = [paper_gain(bb) for bb in PAPER_TABLE1]
    return min(gains), max(gains)


def headline_rows(cfg: LIRConfig, res: dict) -> list[Row]:
    """The paper's headline comparisons beside ours, in accuracy points (ours: mean over
    tasks and seeds of the paired per-seed differences, with the task x seed sign test)."""
    rows = []
    p = res["paired"]
    for key, label, paper, where in (
        ("livr-sft", "LIVR − SFT", paper_gain(PAPER_BACKBONE), "Table 1, 9 tasks"),
        (
            "latents_only-sft",
            "latents-only − SFT",
            paper_gain(PAPER_BACKBONE, "latents_only", "sft", ABL_TASKS),
            "Table 3, 3 tasks",
        ),
        (
            "livr-mask_only",
            "LIVR − mask-only",
            paper_gain(PAPER_BACKBONE, "livr", "mask_only", ABL_TASKS),
            "Table 3, 3 tasks",
        ),
    ):
        if key in p:
            st = p[key]["sign_test"]
            rows.append(
                Row(
                    f"{label} (points)",
                    100 * p[key]["mean"],
                    paper,
                    note=f"sign test {st['wins']}/{st['losses']}/{st['ties']}, p = "
                    f"{st['p_value']:.3g}; paper: {PAPER_BACKBONE}, {where}",
                )
            )
    t2 = res.get("table2")
    if t2:
        st = t2["livr-sft"]["sign_test"]
        rows.append(
            Row(
                "multi-task LIVR − SFT, task mean (points)",
                100 * (t2["livr"]["mean"] - t2["sft"]["mean"]),
                PAPER_TABLE2["livr"]["mean"] - PAPER_TABLE2["sft"]["mean"],
                note=f"sign test p = {st['p_value']:.3g}; paper: {PAPER_BACKBONE}, "
                "Table 2, 6 tasks",
            )
        )
    return rows


def write_report(report: Report, cfg: LIRConfig, preset: str, res: dict) -> None:
    """Every section of the reproduction report, from ``res`` (``lir.reproduce``'s results)."""
    seeds, tasks = cfg.seeds, cfg.tasks
    scale = {
        "tiny": "the `tiny` smoke-test scale",
        "small": "the `small` scale",
        "paper": "the paper's fine-tuning recipe on the tiny model",
    }.get(preset, preset)
    m = cfg.model
    report.paragraph(
        f"Scale: {scale}. A {m.vit_depth}-layer ViT (d {m.vit_dim}) + {m.lm_depth}-layer LM "
        f"(d {m.lm_dim}) at {m.image_size} px, pretrained for {cfg.pretrain.optim.total_steps} steps "
        f"(phase P), then LoRA r {cfg.finetune.lora.rank} fine-tuning per task on "
        f"{cfg.data.n_train} procedural examples for {cfg.finetune.sft_epochs} epochs "
        f"(LIVR {cfg.finetune.stage1_epochs} + {cfg.finetune.stage2_epochs}), K = "
        f"{cfg.finetune.num_latents}, {len(seeds)} seed(s) {list(seeds)}, validation n = "
        f"{cfg.data.n_val}, test n = {cfg.data.n_test}. Accuracies are in %. The paper "
        f"fine-tunes 3-4 B-parameter models on real BLINK-style data with one seed; these are "
        f"small procedural analogues (docs/lir.md D14-D17), so compare directions and "
        f"diagnostics, not levels."
    )
    if preset == "tiny":
        report.paragraph(
            "**This is the `tiny` demo.** Phase P is far too short for the model to learn its "
            "skills well, the splits are small (test n = "
            f"{cfg.data.n_test}, binomial s.e. about "
            f"{100 * math.sqrt(0.25 / cfg.data.n_test):.1f} points) and there are only "
            f"{len(seeds)} seeds, so every difference below is noise-level unless the sign "
            "test says otherwise. It checks that the pipeline runs end to end; the `small` "
            "preset is the reproduction."
        )

    # pretraining
    report.heading("Phase P (pretraining)")
    pm = res["pretrain"]
    report.table(
        ["skill", "held-out accuracy (%)"],
        [[k, _pct(v)] for k, v in pm["skill_accuracy"].items()],
        fmt="{:.1f}",
    )
    report.paragraph(
        f"Cached at `{pm['directory']}`; training took "
        f"{pm.get('train_seconds', 0):.0f} s when it ran."
    )

    if res["headline"]:
        report.rows(
            "Headline comparisons",
            headline_rows(cfg, res),
            fmt="{:.2f}",
            note="Ours: our tasks (listed below), mean over tasks and seeds; paper: "
            "its own tasks and backbone, one seed. Compare signs, not sizes.",
        )

    # table 1
    report.heading("Table 1 analogue: single-task fine-tuning")
    arms_run = ["zero_shot"] + list(cfg.arms)
    pb = PAPER_TABLE1[PAPER_BACKBONE]
    rows = []
    for t in tasks:
        row = [t, _pct(res["chance"][t])]
        for a in arms_run:
            mean, std = res["table1"][t][a], res["table1_std"][t][a]
            row.append(f"{100 * mean:.1f}" + (f" ± {100 * std:.1f}" if a != "zero_shot" else ""))
        if "livr-sft" in res["paired"]:
            row.append(100 * res["paired"]["livr-sft"]["per_task_mean"][t])
        p = pb.get(t, {})
        row += [
            p.get("zero_shot"),
            p.get("sft"),
            p.get("livr"),
            None if "livr" not in p else p["livr"] - p["sft"],
        ]
        rows.append(row)
    headers = (
        ["task", "chance"]
        + arms_run
        + (["Δ LIVR−SFT"] if "livr-sft" in res["paired"] else [])
        + [f"paper zero-shot ({PAPER_BACKBONE})", "paper SFT", "paper LIVR", "paper Δ"]
    )
    report.table(headers, rows, fmt="{:.1f}")
    report.paragraph(
        "Mean ± std over seeds of the test accuracy of the best-validation "
        "checkpoint (LIVR and mask-only: stage-2 epochs only). Paper columns: "
        f"{PAPER_BACKBONE} (LIVR Table 1); `colour_control` is this suite's negative "
        "control and has no paper counterpart. The paper's latents-only / "
        "mask-only numbers (LIVR Table 3, localization / semantic / functional "
        "correspondence) are in results.json under `paper`."
    )
    per_seed_rows = [
        [t, a] + [100 * x for x in res["table1_seeds"][t][a]] for t in tasks for a in cfg.arms
    ]
    report.table(["task", "arm"] + [f"seed {s}" for s in seeds], per_seed_rows, fmt="{:.1f}")

    if res["paired"]:
        report.heading("Paired differences and sign tests", 3)
        rows = []
        for name, p in res["paired"].items():
            st, sr = p["sign_test"], p["sign_test_relational"]
            rows.append(
                [
                    name,
                    100 * p["mean"],
                    f"{st['wins']}/{st['losses']}/{st['ties']}",
                    st["p_value"],
                    f"{sr['wins']}/{sr['losses']}/{sr['ties']}",
                    sr["p_value"],
                ]
            )
        report.table(
            [
                "difference",
                "mean (points)",
                "wins/losses/ties (all task×seed)",
                "sign-test p",
                "w/l/t (relational tasks)",
                "p (relational)",
            ],
            rows,
            fmt="{:.3g}",
        )

    # diagnostics
    report.heading("Are the latents used? (LIVR §4.4.1)")
    diag = res["diagnostics"]["all"]
    rows = []
    labels = {
        "accuracy": "standard mask, latents present",
        "accuracy_latents_dropped": "standard mask, latents removed",
        "accuracy_test_bottleneck": "bottleneck mask at test",
        "accuracy_bottleneck_dropped": "bottleneck mask + latents removed",
        "answer_latent_attention": "answer→latent attention mass",
    }
    shown = [a for a in ("sft", "latents_only", "livr", "mask_only") if a in cfg.arms]
    for k in DIAG_KEYS:
        f = (lambda x: x) if k == "answer_latent_attention" else _pct
        rows.append([labels[k]] + [f(diag[a][k]) for a in shown] + list(PAPER_DIAGNOSTICS[k]))
    report.table(
        ["condition (mean over tasks and seeds)"] + shown + ["paper latents-only", "paper LIVR"],
        rows,
        fmt="{:.3g}",
    )
    report.paragraph(
        "Paper: Qwen3-VL-4B on localization (chance 50%). With the bottleneck "
        "mask and no latents the image has no route to the answer, so every model "
        "answers from the prompt alone there: chance, or the frequency of the "
        "class it then always picks when classes are unbalanced (a check of the "
        "mask implementation)."
    )
    per_task = [
        [t, a]
        + [_pct(res["diagnostics"][t][a][k]) for k in DIAG_KEYS[:4]]
        + [res["diagnostics"][t][a]["answer_latent_attention"]]
        for t in tasks
        for a in shown
    ]
    report.table(
        ["task", "arm", "present", "latents removed", "test bottleneck", "both", "attn→latents"],
        per_task,
        fmt="{:.3g}",
    )

    # ablations
    ab = res["ablations"]
    if ab:
        report.heading(f"Ablations (LIVR §4.4.2-4.4.3; LIVR, mean over seeds {ab['seeds']})")
        for key, title, paper in (
            ("stage_split", "Stage-1 epochs (total fixed)", PAPER_STAGE_SPLIT),
            ("num_latents", "Number of latents K", PAPER_K),
            ("mask_variants", "Stage-1 mask variant", PAPER_MASKS),
            ("latent_design", "Latent placement and sharing", PAPER_LATENT_DESIGN),
        ):
            report.heading(title, 3)
            rows = []
            for t, vals in ab.get(key, {}).items():
                col = ABL_TASKS.index(t) if t in ABL_TASKS else None
                for setting, (mean, std) in vals.items():
                    pv = paper.get(setting) if col is not None else None
                    rows.append(
                        [
                            t,
                            setting,
                            f"{100 * mean:.1f} ± {100 * std:.1f}",
                            None if pv is None else pv[col],
                        ]
                    )
            report.table(["task", "setting", "ours (%)", "paper (%)"], rows, fmt="{:.1f}")

    t2 = res["table2"]
    if t2:
        report.heading(
            f"Table 2 analogue: multi-task fine-tuning (final checkpoint, seeds {t2['seeds']})"
        )
        rows = []
        for name in ("zero_shot", "sft", "livr"):
            rows.append(
                [name]
                + [100 * t2[name]["per_task"][t] for t in t2["tasks"]]
                + [100 * t2[name]["mean"], PAPER_TABLE2[name]["mean"]]
            )
        rows.append(
            ["Δ LIVR−SFT"]
            + [100 * (t2["livr"]["per_task"][t] - t2["sft"]["per_task"][t]) for t in t2["tasks"]]
            + [
                100 * (t2["livr"]["mean"] - t2["sft"]["mean"]),
                PAPER_TABLE2["livr"]["mean"] - PAPER_TABLE2["sft"]["mean"],
            ]
        )
        report.table(["method"] + t2["tasks"] + ["mean", "paper mean"], rows, fmt="{:.1f}")
        st = t2["livr-sft"]["sign_test"]
        report.paragraph(
            f"One model per seed trained on the union of the {len(t2['tasks'])} tasks "
            f"({cfg.data.n_train} examples each; SFT {cfg.finetune.multitask_sft_epochs} epochs "
            f"vs LIVR {cfg.finetune.multitask_stage1_epochs} + "
            f"{cfg.finetune.multitask_stage2_epochs}), evaluated per task at the final "
            "checkpoint. Zero-shot is the phase-P model. Per-seed LIVR − SFT of the task mean: "
            + ", ".join(f"{100 * d:+.1f}" for d in t2["livr-sft"]["per_seed"])
            + f" points; task×seed sign test {st['wins']}/{st['losses']}/{st['ties']} "
            f"(p = {st['p_value']:.3g}). Paper ({PAPER_BACKBONE}, six different tasks): "
            f"{PAPER_TABLE2['livr']['mean'] - PAPER_TABLE2['sft']['mean']:+.2f} points mean "
            "(LIVR Table 2)."
        )

    if res["attention_plot"]:
        report.heading("Latent→image attention")
        report.image(
            res["attention_plot"],
            "mean attention of the K latent queries to the "
            "image patches (LIVR, seed 0, standard mask); title numbers are the total "
            "mass on each image",
        )

    report.heading("Analysis")
    report.paragraph(_analysis(cfg, res))
    c = res["compute"]
    report.paragraph(
        "Compute time per stage: "
        + ", ".join(f"{k} {v:.0f} s" for k, v in c["stages"].items())
        + f" ({c['total_seconds']:.0f} s in all). A stage whose results were loaded from the "
        "run's caches counts the time they took when they were computed"
        + (f" (loaded here: {', '.join(c['stages_from_cache'])})" if c["stages_from_cache"] else "")
        + "; results cached before their compute time was recorded count 0 s."
    )


def _analysis(cfg: LIRConfig, res: dict) -> str:
    """Plain statements of what the numbers say about the paper's claims (docs/lir.md D19)."""
    lines = []
    p = res["paired"]
    if "livr-sft" in p:
        q = p["livr-sft"]
        st = q["sign_test"]
        lo, hi = paper_gain_range()
        verdict = (
            "LIVR beats SFT"
            if q["mean"] > 0 and st["p_value"] < 0.05
            else "SFT beats LIVR"
            if q["mean"] < 0 and st["p_value"] < 0.05
            else "no significant LIVR−SFT difference"
        )
        lines.append(
            f"- C1 (LIVR > SFT): mean paired difference {100 * q['mean']:+.1f} "
            f"points; LIVR wins {st['wins']}, loses {st['losses']}, ties {st['ties']} "
            f"of the task×seed pairs (sign test p = {st['p_value']:.3g}): {verdict}. "
            f"The paper reports {lo:+.1f} to {hi:+.1f} points over its backbones "
            "(one seed per task)."
        )
    if "latents_only-sft" in p:
        q = p["latents_only-sft"]
        lines.append(
            f"- C2 (latents-only ≈ SFT): mean difference {100 * q['mean']:+.1f} "
            f"points (sign test p = {q['sign_test']['p_value']:.3g})."
        )
    if "livr-mask_only" in p:
        q = p["livr-mask_only"]
        lines.append(
            f"- C3 (mask-only < LIVR): LIVR − mask-only {100 * q['mean']:+.1f} points "
            f"(sign test p = {q['sign_test']['p_value']:.3g})."
        )
    d = res["diagnostics"]["all"]
    if "livr" in d:
        lv = d["livr"]
        parts = [
            f"LIVR: {100 * lv['accuracy']:.1f}% with latents, "
            f"{100 * lv['accuracy_latents_dropped']:.1f}% without, "
            f"{100 * lv['accuracy_test_bottleneck']:.1f}% under the test-time bottleneck, "
            f"attention mass {lv['answer_latent_attention']:.3f}"
        ]
        for a in ("latents_only", "sft"):
            if a in d:
                parts.append(
                    f"{a}: {100 * d[a]['accuracy_test_bottleneck']:.1f}% under the "
                    f"bottleneck, {100 * d[a]['accuracy_latents_dropped']:.1f}% without "
                    f"latents, attention mass {d[a]['answer_latent_attention']:.3f}"
                )
        chance = float(np.mean([res["chance"][t] for t in cfg.tasks]))
        lines.append(
            "- C4 (latent usage; mean task chance "
            f"{100 * chance:.1f}%): " + "; ".join(parts) + ". The paper's pattern is "
            "LIVR far above chance under the bottleneck and dropping without latents, "
            "latents-only at chance under the bottleneck and unchanged without latents."
        )
    t2 = res.get("table2")
    if t2:
        st = t2["livr-sft"]["sign_test"]
        lines.append(
            f"- Multi-task (Table 2): LIVR {100 * t2['livr']['mean']:.1f}% vs SFT "
            f"{100 * t2['sft']['mean']:.1f}% mean over tasks "
            f"({100 * (t2['livr']['mean'] - t2['sft']['mean']):+.1f} points; task×seed "
            f"sign test p = {st['p_value']:.3g}); the paper reports "
            f"{PAPER_TABLE2['livr']['mean'] - PAPER_TABLE2['sft']['mean']:+.2f}."
        )
    zs = np.mean([res["table1"][t]["zero_shot"] for t in cfg.tasks])
    lines.append(
        f"- Zero-shot (phase-P model, never trained on these tasks) averages {100 * zs:.1f}%."
    )
    return "\n".join(lines)


def plot_latent_attention(model, batch, path: str | os.PathLike, title: str = "") -> str:
    """Each example of ``batch`` as a column: each image above the latents' mean attention
    map over its patches (``lir.evaluate.latent_image_attention``). Writes a PNG; returns its
    path."""
    maps = latent_image_attention(model, batch)
    b, m = maps.shape[:2]
    valid = np.asarray(batch.image_valid)
    # columns: examples; rows: (image j, latent attention over image j) for each slot j
    fig, axes = figure(2 * m, b, figsize=(2.0 * b, 2.0 * 2 * m), dpi=110, squeeze=False)
    for i in range(b):
        for j in range(m):
            top, bottom = axes[2 * j, i], axes[2 * j + 1, i]
            top.axis("off")
            bottom.axis("off")
            if not valid[i, j]:
                continue
            top.imshow(batch.images[i, j], interpolation="nearest")
            top.set_title(f"example {i}, image {j + 1}", fontsize=7)
            bottom.imshow(maps[i, j], cmap="inferno", interpolation="nearest")
            bottom.set_title(f"latent attention (mass {maps[i, j].sum():.2f})", fontsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    return savefig(fig, path)
