"""Builds `base.md` (base model, probes, supervised controllers) from a finished run dir.

    python -m internal_rl report --run-dir DIR [--out reports/internal_rl]

Reads only what the stages wrote (config.json, commands.txt, stage_times.jsonl,
pretrain/metrics.jsonl + summary.json, probe/results.json, control/results.json), copies
the plots next to the report and puts our numbers beside the paper's where the paper
gives any (most of its results exist only as figures; the approximate values its text and
Figs. 3, 4, A1 and A2 give are quoted).
"""

from __future__ import annotations

import json
import pathlib
import shutil

from common.metrics import metric_series, plot_curves, read_metrics
from common.report import Report

PAPER_PROBE = (
    "≈0.3 at the input layers, rising to ≈0.5 around mid-depth (layers 3–4 of 6) "
    "and staying high to layer 6; chance 0.25 (Fig. 3, Fig. A1)"
)
PAPER_CONTROL = (
    "best at mid-depth insertion; ≈0.5–0.7 held-out success for good 6-layer "
    "backbones (Fig. 4, Fig. A2); uncontrolled base model ≈0"
)


def _load(path: pathlib.Path):
    return json.loads(path.read_text()) if path.exists() else None


def _partial_control(control_dir: pathlib.Path) -> dict | None:
    """Control results of the layers finished so far (an interrupted or running sweep)."""
    unc = _load(control_dir / "uncontrolled.json")
    done = sorted(
        (json.loads(f.read_text()) for f in control_dir.glob("layer_*/results.json")),
        key=lambda r: r["layer"],
    )
    if unc is None or not done:
        return None
    return dict(
        layers=[r["layer"] for r in done],
        post_task_success=[r["post_task"]["success_rate"] for r in done],
        post_task_progress=[r["post_task"]["mean_progress"] for r in done],
        pretrain_task_success=[r["pretrain_tasks"]["success_rate"] for r in done],
        uncontrolled_post_task=unc,
        eval_episodes=None,
        partial=True,
    )


def write_base_report(
    run_dir: str | pathlib.Path, out_dir: str | pathlib.Path, name: str = "base"
) -> pathlib.Path:
    run_dir, out_dir = pathlib.Path(run_dir), pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg = _load(run_dir / "config.json") or {}
    commands = (
        (run_dir / "commands.txt").read_text().strip().splitlines()
        if (run_dir / "commands.txt").exists()
        else []
    )
    times = (
        [json.loads(s) for s in (run_dir / "stage_times.jsonl").read_text().splitlines()]
        if (run_dir / "stage_times.jsonl").exists()
        else []
    )
    wall = sum(t["seconds"] for t in times)
    report = Report(
        "Internal RL, part 1: base model, probes, supervised controllers",
        command=" && ".join(dict.fromkeys(commands)) or "(unknown)",
    )
    stage_rows = {}
    for t in times:
        stage_rows[t["stage"]] = stage_rows.get(t["stage"], 0.0) + t["seconds"]
    m = cfg.get("model", {})
    report.paragraph(
        f"Gridworld-pinpad (G=7, 8 colours, 4 walls, T=100), expert data generated on the fly. "
        f"Base model: causal transformer d={m.get('dim')}, L={m.get('depth')}, "
        f"{m.get('num_heads')} heads, MLP {m.get('mlp_hidden')} ReLU, T5 relative bias; "
        f"batch {cfg.get('data', {}).get('batch_size')}, "
        f"{cfg.get('pretrain', {}).get('steps')} steps (the paper: d=256, L=6, batch 1024, "
        f"256k steps, 10 seeds; here one seed). Wall time per stage (s, all invocations): "
        + ", ".join(f"{k} {v:.0f}" for k, v in stage_rows.items())
        + "."
    )
    results: dict = {"config": cfg, "stage_seconds": stage_rows}

    summary = _load(run_dir / "pretrain" / "summary.json")
    metrics_path = run_dir / "pretrain" / "metrics.jsonl"
    if metrics_path.exists():
        recs = read_metrics(metrics_path)
        series = {k: metric_series(recs, k) for k in ("action_acc", "eval/heldout_action_acc")}
        series = {k: v for k, v in series.items() if len(v[0])}
        plot_curves(
            series,
            out_dir / f"{name}_pretrain_action_acc.png",
            title="Base model: next-action accuracy (teacher forced)",
            ylabel="accuracy",
        )
        report.heading("Pretraining")
        report.image(f"{name}_pretrain_action_acc.png", "next-action accuracy during pretraining")
    if summary:
        results["pretrain"] = summary
        report.compare(
            None,
            {
                "held-out action accuracy (teacher forced)": summary.get("heldout_action_acc"),
                "held-out action NLL": summary.get("heldout_action_nll"),
                "next agent-cell accuracy": summary.get("heldout_agent_obs_acc"),
                "closed-loop success, pretraining tasks": summary.get("pretrain_task_success_rate"),
                "closed-loop success, held-out task": summary.get("post_task_success_rate"),
            },
            {"closed-loop success, held-out task": "≈1e-6 (raw sampling)"},
            fmt="{:.3f}",
            note="The task is not observed, so even a perfect imitator succeeds on a given "
            "pretraining task only when its sampled subgoal order matches it "
            "(≈1/16 of the time).",
        )

    probe = _load(run_dir / "probe" / "results.json")
    if probe:
        results["probe"] = probe
        report.heading("Linear probes (Fig. 3 / A1 analogue)")
        report.table(
            ["layer", "held-out accuracy", "train accuracy"],
            [
                [str(i), a, b]
                for i, a, b in zip(
                    probe["layers"], probe["eval_accuracy"], probe["train_accuracy"], strict=True
                )
            ],
            fmt="{:.3f}",
        )
        report.paragraph(
            f"Chance 0.25, majority class {probe['majority_baseline']:.3f}; "
            f"{probe['eval_tokens']} held-out tokens. Paper: {PAPER_PROBE}."
        )
        pngs = ["probe_accuracy_by_layer.png", "probe_accuracy_by_position.png"]
        if probe.get("by_checkpoint"):
            pngs.append("probe_accuracy_by_checkpoint.png")
            report.table(
                ["pretraining step"] + [f"layer {i}" for i in probe["layers"]],
                [[k] + v["eval_accuracy"] for k, v in probe["by_checkpoint"].items()],
                fmt="{:.3f}",
            )
        for png in pngs:
            shutil.copy(run_dir / "probe" / png, out_dir / f"{name}_{png}")
            report.image(f"{name}_{png}", png[:-4].replace("_", " "))

    control = _load(run_dir / "control" / "results.json") or _partial_control(run_dir / "control")
    if control:
        results["control"] = control
        report.heading("Supervised controllers on the held-out task (Fig. 4 analogue)")
        unc = control["uncontrolled_post_task"]
        report.table(
            [
                "insertion layer",
                "held-out success",
                "fraction of colours reached",
                "pretraining-task success",
            ],
            [
                [str(i), a, b, c]
                for i, a, b, c in zip(
                    control["layers"],
                    control["post_task_success"],
                    control["post_task_progress"],
                    control["pretrain_task_success"],
                    strict=True,
                )
            ]
            + [["none (base)", unc["success_rate"], unc["mean_progress"], None]],
            fmt="{:.3f}",
        )
        n_eval = control["eval_episodes"] or (_load(run_dir / "config.json") or {}).get(
            "control", {}
        ).get("eval_episodes")
        partial = (
            " Partial sweep: only the layers listed had finished." if control.get("partial") else ""
        )
        report.paragraph(
            f"{n_eval} episodes per entry, controllers switched at ground-truth "
            f"subgoal completions. Paper: {PAPER_CONTROL}.{partial}"
        )
        png = run_dir / "control" / "controller_success_by_layer.png"
        if png.exists() and not control.get("partial"):
            shutil.copy(png, out_dir / f"{name}_controller_success_by_layer.png")
            report.image(f"{name}_controller_success_by_layer.png", "success vs insertion layer")

    notes = run_dir / "notes.md"  # free-text discussion written after looking at the run
    if notes.exists():
        report.heading("Discussion")
        report.paragraph(notes.read_text())

    prov = report.provenance(wall)
    md = out_dir / f"{name}.md"
    md.write_text(report.render(prov))
    (out_dir / f"{name}_results.json").write_text(
        json.dumps({"provenance": prov, "results": results}, indent=2, default=str)
    )
    return md
