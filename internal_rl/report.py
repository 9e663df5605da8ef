"""The internal-RL reproduction report: tables, figures and prose from the stage outputs.

`write_report(cfg, run_dir, parts, ...)` writes report.md + results.json (+ the Figs. 6, 7,
8 analogues) into run_dir from what `internal_rl.reproduce.run_stages` returns; the paper's
side of every comparison comes from `internal_rl.paper`.
"""

from __future__ import annotations

import inspect
import pathlib

import numpy as np

from common.metrics import plot_curves
from common.report import Report, Row, StageClock, figure, rows_json, savefig
from internal_rl import paper
from internal_rl.pipeline import PipelineConfig, is_continuous, presets_for

# ---------------------------------------------------------------------------------------
# Summaries
# ---------------------------------------------------------------------------------------


def final_success(curve: dict, fraction: float) -> float:
    """Mean on-policy success over the last `fraction` of a run's updates."""
    s = np.asarray(curve["success_rate"], float)
    k = max(1, int(round(fraction * len(s))))
    return float(np.mean(s[-k:]))


def quantile_curves(
    curves: list[dict], key: str = "success_rate"
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(episodes [n], 25%, median, 75% [n]) over seeds (runs truncated to the shortest)."""
    n = min(len(c[key]) for c in curves)
    y = np.asarray([c[key][:n] for c in curves], float)
    q25, med, q75 = np.percentile(y, [25, 50, 75], axis=0)
    return np.asarray(curves[0]["episodes"][:n]), q25, med, q75


def summarize_rl(curves: dict[str, list[dict]], fraction: float) -> dict:
    out = {}
    for method, runs in curves.items():
        finals = [final_success(r, fraction) for r in runs]
        q25, med, q75 = np.percentile(finals, [25, 50, 75])
        out[method] = dict(
            median=float(med),
            q25=float(q25),
            q75=float(q75),
            per_seed=finals,
            initial_success=float(np.median([r["success_rate"][0] for r in runs])),
            max_success=float(np.max([np.max(r["success_rate"]) for r in runs])),
            decisions_per_episode=float(
                np.median([np.mean(r["decisions_per_episode"][-5:]) for r in runs])
            ),
            episodes=int(runs[0]["episodes"][-1]),
            wall_seconds=float(np.sum([r["wall_seconds"] for r in runs])),
        )
    return out


# ---------------------------------------------------------------------------------------
# Figures
# ---------------------------------------------------------------------------------------


def plot_beta_traces(traces: dict, path: pathlib.Path, title: str) -> str:
    """Fig. 6 / A3 analogue: β_t (line) over the ground-truth subgoal (shaded segments)."""
    import matplotlib

    beta = np.asarray(traces["beta"], float)
    subgoal = np.asarray(traces["subgoal"])
    mask = np.asarray(traces["mask"], bool)
    n = beta.shape[0]
    fig, axes = figure(n, 1, figsize=(6.0, 1.5 * n + 0.4), squeeze=False)
    colours = matplotlib.colormaps["tab10"]
    for i, ax in enumerate(axes[:, 0]):
        t_end = max(int(mask[i].sum()), 1)
        t = np.arange(t_end)
        for s in range(t_end):
            ax.axvspan(
                s - 0.5, s + 0.5, color=colours(int(subgoal[i, s]) % 10), alpha=0.18, linewidth=0
            )
        ax.plot(t, beta[i, :t_end], color="black", marker="o", markersize=2.5, linewidth=1.2)
        starts = [s for s in range(1, t_end) if subgoal[i, s] != subgoal[i, s - 1]]
        for s in starts:
            ax.axvline(s, color="red", linestyle="--", linewidth=0.8)
        ax.set_ylim(-0.05, 1.05)
        ax.set_ylabel("β_t")
    axes[0, 0].set_title(title, fontsize=9)
    axes[-1, 0].set_xlabel("time step (shading: ground-truth subgoal; dashed: subgoal change)")
    return savefig(fig, path)


def plot_rate_distortion(mc: dict, path: pathlib.Path) -> str:
    """Fig. 7 analogue: rate (KL per step) vs distortion (action NLL) over α."""
    series = {}
    for label, results in (("frozen base", mc["frozen"]), ("co-trained", mc["cotrained"])):
        if not results:
            continue
        rows = sorted(
            (r["variant"]["alpha"], r["metrics"]["action_nll"], r["metrics"]["kl"]) for r in results
        )
        series[label] = ([r[1] for r in rows], [r[2] for r in rows])
    return plot_curves(
        series,
        path,
        title="Rate–distortion over α (points: α ascending ←)",
        xlabel="distortion: action NLL per step",
        ylabel="rate: KL per step",
    )


RL_TASK_TITLES = {
    "heldout": "the held-out task A-B-C-D-A-B",
    "seen_transitions": "the seen-transition task A-C-B-D-C-A",
}
CONTINUOUS_RL_TASK_TITLES = {
    "heldout": "the held-out task 0-1-2-3",
    "seen_transitions": "the seen-transition task 0-3-2-1",
}


def plot_rl_curves(
    curves: dict[str, list[dict]],
    path: pathlib.Path,
    task: str = "heldout",
    titles: dict[str, str] | None = None,
) -> str:
    """Fig. 8 analogue: success vs episodes, median over seeds with the 25–75% band."""
    fig, ax = figure(figsize=(5.8, 3.8))
    for method, runs in curves.items():
        x, q25, med, q75 = quantile_curves(runs)
        (line,) = ax.plot(x, med, label=f"{method} (n={len(runs)})", linewidth=1.5)
        ax.fill_between(x, q25, q75, color=line.get_color(), alpha=0.2, linewidth=0)
    ax.set_xlabel("episodes")
    ax.set_ylabel("success rate")
    ax.set_title(f"RL on {(titles or RL_TASK_TITLES)[task]}: median, 25–75% over seeds", fontsize=9)
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return savefig(fig, path)


# ---------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------


def _preset_notes(cfg: PipelineConfig, preset: str | None) -> str:
    fn = presets_for(cfg.env.kind if is_continuous(cfg) else "gridworld").get(preset or "")
    return inspect.cleandoc(fn.__doc__ or "") if fn else ""


def _setting(cfg: PipelineConfig) -> dict:
    """The environment-specific sentences of the report."""
    layer = cfg.metacontroller.insertion_layer(cfg.model.depth)
    if not is_continuous(cfg):
        return dict(
            title="Internal RL reproduction",
            intro=(
                "Gridworld-pinpad, pretraining on the 16 Table A1 tasks, RL on the held-out "
                "12-colour task A-B-C-D-A-B (only unseen pair transitions). "
                f"Base model d={cfg.model.dim}, L={cfg.model.depth}; metacontroller at layer "
                f"{layer}."
            ),
            fit=("teacher-forced action accuracy", "heldout_action_acc"),
            heldout_paper=paper.HELDOUT_BASE_SUCCESS["grid"],
            titles=RL_TASK_TITLES,
            paper=paper.GRID,
            seen_task="A-C-B-D-C-A, 12 colours, only pair transitions of the pretraining tasks",
            diagnostic=(
                "A-C-B-D-C-A: as long and as sparse as the held-out task (6 subgoals, "
                "12 colours, reward only at the end) but made only of pair transitions "
                "the pretraining tasks contain. It isolates the long-horizon, "
                "sparse-reward part of the problem (what temporal abstraction "
                "addresses) from compositional generalisation to unseen transitions."
            ),
        )
    e = cfg.env
    return dict(
        title=f"Internal RL reproduction, {e.kind.capitalize()}-pinpad",
        intro=(
            f"{e.kind.capitalize()}-pinpad in MJX ({e.size}×{e.size} cells of size "
            f"{e.cell_size:g}, {e.num_colours} colours, {e.num_walls} wall, T = {e.horizon}), "
            "pretraining on the 16 Table A2 tasks of a scripted BFS + PD expert (action "
            f"noise σ = {cfg.data.noise_std:g} for D, {cfg.data.star_noise_std:g} for D* "
            "which trains the controllers and the metacontroller), RL on the held-out task "
            "0-1-2-3. The scripted expert succeeds on every task, so RL success needs no "
            "normalisation (the paper divides its ant numbers by the ant expert's 0.7). "
            f"Hawk base model d={cfg.model.dim}, L={cfg.model.depth}; metacontroller at "
            f"layer {layer}."
        ),
        fit=("teacher-forced action MSE", "heldout_action_mse"),
        heldout_paper=paper.HELDOUT_BASE_SUCCESS["continuous"],
        titles=CONTINUOUS_RL_TASK_TITLES,
        paper=paper.CONTINUOUS,
        seen_task="0-3-2-1, only colour transitions of the pretraining tasks",
        diagnostic=(
            "0-3-2-1: as long and as sparse as the held-out task 0-1-2-3 (4 colours, "
            "reward only at the end) but every transition (0→3, 3→2, 2→1) occurs in "
            "the pretraining tasks, while 0→1, 1→2 and 2→3 never do. It separates "
            "the sparse-reward part of the problem from composing unseen "
            "transitions."
        ),
    )


def _mc_rows(results: list[dict], kind: str) -> list[list]:
    rows = []
    for r in sorted(results, key=lambda r: (r["variant"]["alpha"], r["variant"]["seed"])):
        m = r["metrics"]
        rows.append(
            [
                kind,
                r["variant"]["alpha"],
                r["variant"]["seed"],
                m["action_nll"],
                m["kl"],
                m["switches"],
                m["subgoals_per_trajectory"],
                m["switch_precision"],
                m["switch_recall"],
            ]
        )
    return rows


def _reference_rows(setting: dict, results: dict) -> list[Row]:
    """The paper's reference points beside ours (None where a stage did not run)."""
    probe = results.get("probe_accuracy_by_layer")
    mid = probe[len(probe) // 2] if probe else None
    mc = results.get("metacontroller")
    switches = None
    if mc:
        chosen = [
            m for k, m in mc["frozen"].items() if float(k.split("/")[0]) == mc["selected_alpha"]
        ]
        switches = float(np.mean([m["switches"] for m in chosen]))
    finals = results.get("rl_final_success") or {}
    baselines = [v for k, v in finals.items() if k != "internal_rl"]
    ours = {
        "probe accuracy, mid-depth": mid,
        "switches per trajectory (frozen, good α)": switches,
        "internal RL final success": finals.get("internal_rl"),
        "baselines final success": max(baselines) if baselines else None,
    }
    notes = {"baselines final success": "ours: the best baseline's median"}
    return [Row(k, ours.get(k), v, note=notes.get(k, "")) for k, v in setting["paper"].items()]


def write_report(
    cfg: PipelineConfig,
    run_dir: pathlib.Path,
    parts: dict,
    *,
    preset: str | None,
    command: str | None,
    wall_seconds: float | None = None,
    clock: StageClock | None = None,
) -> tuple[str, str]:
    """report.md + results.json (+ figures) into run_dir from the stage outputs; with a
    `clock` the provenance states each stage's compute seconds (cached stages included)."""
    setting = _setting(cfg)
    rep = Report(f"{setting['title']} ({preset or 'custom'} preset)", command=command)
    notes = _preset_notes(cfg, preset)
    rep.paragraph(
        setting["intro"]
        + (
            "\n\nPreset notes (deviations from the paper and why):\n\n> "
            + notes.replace("\n", "\n> ")
            if notes
            else ""
        )
    )
    results: dict = {}

    pre = parts.get("pretrain")
    if pre:
        rep.heading("Base model")
        rows = [
            Row(setting["fit"][0], pre.get(setting["fit"][1])),
            Row("action NLL", pre.get("heldout_action_nll")),
            Row("closed-loop success, pretraining tasks", pre.get("pretrain_task_success_rate")),
            Row(
                "fraction of colours reached, pretraining tasks",
                pre.get("pretrain_task_mean_progress"),
            ),
            Row(
                "closed-loop success, held-out task",
                pre.get("post_task_success_rate"),
                setting["heldout_paper"],
            ),
        ]
        rep.rows(None, rows)
        base = {r.metric: r.ours for r in rows}
        rep.paragraph(
            "The task is not observed: a perfect imitator picks each next subgoal as "
            "the data do, so it matches one given pretraining task with probability 1/16 "
            "(success ≈ 0.0625 is the ceiling of the pretraining-task success)."
        )
        results["base"] = base
    probe = parts.get("probe")
    if probe:
        rep.heading("Linear probes (Fig. 3 / A1 analogue)")
        rep.table(
            ["layer", "held-out accuracy", "train accuracy"],
            [
                [layer, a, b]
                for layer, a, b in zip(
                    probe["layers"], probe["eval_accuracy"], probe["train_accuracy"], strict=True
                )
            ],
        )
        rep.paragraph(
            f"Chance {probe['chance']:.3f}, majority class "
            f"{probe.get('majority_baseline', float('nan')):.3f}. Paper: "
            f"{paper.PROBE_BY_DEPTH}."
        )
        results["probe_accuracy_by_layer"] = probe["eval_accuracy"]
    control = parts.get("control")
    if control:
        rep.heading("Supervised controllers (Fig. 4 analogue)")
        seen = control.get("seen_transition_task_success") or [None] * len(control["layers"])
        rep.table(
            [
                "insertion layer",
                "held-out success",
                "colours reached",
                "seen-transition task success",
            ],
            [
                [layer, s, p, q]
                for layer, s, p, q in zip(
                    control["layers"],
                    control["post_task_success"],
                    control["post_task_progress"],
                    seen,
                    strict=True,
                )
            ]
            + [
                [
                    "none (base)",
                    control["uncontrolled_post_task"]["success_rate"],
                    control["uncontrolled_post_task"]["mean_progress"],
                    None,
                ]
            ],
        )
        rep.paragraph(
            "Controllers switched by the ground-truth subgoal labels, evaluated "
            "closed loop."
            + (
                f" The seen-transition task ({setting['seen_task']}) separates "
                "executing a sequence of known abstract actions from composing "
                "unseen transitions."
                if control.get("seen_transition_task_success")
                else ""
            )
        )
        if control.get("seen_transition_task_success"):
            results["controller_seen_transition_success_by_layer"] = dict(
                zip(
                    map(str, control["layers"]),
                    control["seen_transition_task_success"],
                    strict=True,
                )
            )
        results["controller_success_by_layer"] = dict(
            zip(map(str, control["layers"]), control["post_task_success"], strict=True)
        )

    mc = parts.get("metacontroller")
    if mc:
        rep.heading("Metacontroller (Figs. 6, 7, A3 analogues)")
        rep.table(
            [
                "variant",
                "α",
                "seed",
                "NLL",
                "KL",
                "switches/traj",
                "subgoals/traj",
                "precision ±1",
                "recall ±1",
            ],
            _mc_rows(mc["frozen"], "frozen")
            + _mc_rows([mc["beta1"]], "β ≡ 1")
            + _mc_rows(mc["cotrained"], "co-trained"),
        )
        rep.paragraph(
            f"Selected α = {mc['selected_alpha']:g} (best switch F1 against the "
            "ground-truth subgoal boundaries, ±1 step; the first step counts as a "
            f"boundary). Paper: {paper.METACONTROLLER}."
        )
        selected = next(r for r in mc["frozen"] if r["variant"]["alpha"] == mc["selected_alpha"])
        plot_beta_traces(
            selected["traces"],
            run_dir / "fig6_beta_traces.png",
            f"β_t, frozen base, α = {mc['selected_alpha']:g}",
        )
        rep.image("fig6_beta_traces.png", "switching gate β_t vs ground-truth subgoals")
        if mc["cotrained"]:
            cot = next(r for r in mc["cotrained"] if r["variant"]["alpha"] == mc["cotrained_alpha"])
            plot_beta_traces(
                cot["traces"],
                run_dir / "fig6_beta_traces_cotrained.png",
                f"β_t, co-trained, α = {mc['cotrained_alpha']:g}",
            )
            rep.image("fig6_beta_traces_cotrained.png", "β_t of the co-trained metacontroller")
        plot_rate_distortion(mc, run_dir / "fig7_rate_distortion.png")
        rep.image("fig7_rate_distortion.png", "rate–distortion, frozen vs co-trained")
        results["metacontroller"] = dict(
            selected_alpha=mc["selected_alpha"],
            frozen={
                f"{r['variant']['alpha']:g}/{r['variant']['seed']}": r["metrics"]
                for r in mc["frozen"]
            },
            beta1=mc["beta1"]["metrics"],
            cotrained={f"{r['variant']['alpha']:g}": r["metrics"] for r in mc["cotrained"]},
        )

    for task, curves in (parts.get("rl") or {}).items():
        summary = summarize_rl(curves, cfg.reproduce.final_fraction)
        if task == "heldout":
            rep.heading("RL on the held-out task (Fig. 8 / A5 analogue)")
        else:
            rep.heading("RL on the diagnostic seen-transition task (not in the paper)")
            rep.paragraph(setting["diagnostic"])
        rep.table(
            [
                "method",
                "final success (median)",
                "25%",
                "75%",
                "first-update success",
                "best update",
                "decisions/episode",
                "episodes",
                "wall s",
            ],
            [
                [
                    m,
                    s["median"],
                    s["q25"],
                    s["q75"],
                    s["initial_success"],
                    s["max_success"],
                    s["decisions_per_episode"],
                    s["episodes"],
                    s["wall_seconds"],
                ]
                for m, s in summary.items()
            ],
        )
        rep.paragraph(
            f"Final success = mean on-policy success of the last "
            f"{cfg.reproduce.final_fraction:.0%} of updates, median over "
            f"{cfg.reproduce.rl_seeds} seed(s). Batch {cfg.rl.batch_episodes} episodes per "
            f"update, lr {cfg.rl.optim.learning_rate:g} (raw-action RL "
            f"{cfg.reproduce.raw_learning_rate:g})."
            + (f" Paper: {paper.RL_HELDOUT}." if task == "heldout" else "")
        )
        fig = "fig8_rl_success.png" if task == "heldout" else f"fig8_rl_success_{task}.png"
        plot_rl_curves(curves, run_dir / fig, task, setting["titles"])
        rep.image(fig, f"success vs episodes per method, {setting['titles'][task]}")
        finals = {m: s["median"] for m, s in summary.items()}
        if task == "heldout":
            results["rl_final_success"] = finals
        results.setdefault("rl_final_success_by_task", {})[task] = finals
        results.setdefault("rl_summary", {})[task] = summary
    rep.heading("Paper reference points")
    reference = _reference_rows(setting, results)
    rep.rows(None, reference)
    results["paper_reference"] = rows_json(reference)
    if clock is not None and clock.seconds:
        rep.heading("Compute")
        rep.table(
            ["stage", "compute s", "read back from cache"],
            [[k, v, "yes" if clock.from_cache[k] else "no"] for k, v in clock.seconds.items()],
            fmt="{:.0f}",
        )
        rep.paragraph(
            "Compute seconds of every stage, including stages computed by an earlier "
            "invocation and read back from their cached results (each cache file "
            "keeps the seconds its computation took). A training stage resumed "
            "from a checkpoint counts the invocation that finished it."
        )
    return rep.write(run_dir, results, wall_seconds=wall_seconds, clock=clock)
