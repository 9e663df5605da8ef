"""The reproduce chain: summaries of RL curves, the report from given stage outputs, and
(slow) the whole chain end to end on a further-reduced config, resumed without rework."""

import json

import numpy as np
import pytest

from internal_rl.__main__ import main
from internal_rl.config import RL_METHODS, make_config
from internal_rl.report import final_success, quantile_curves, summarize_rl, write_report

REDUCED = [
    "data.batch_size=8",
    "data.max_len=32",
    "model.dim=16",
    "model.depth=2",
    "model.num_heads=2",
    "model.mlp_hidden=32",
    "pretrain.steps=20",
    "pretrain.optim.total_steps=20",
    "pretrain.eval_every=20",
    "pretrain.save_every=20",
    "pretrain.eval_episodes=8",
    "probe.train_trajectories=16",
    "probe.eval_trajectories=16",
    "probe.steps=10",
    "probe.batch_size=64",
    "control.steps=4",
    "control.batch_size=4",
    "control.eval_episodes=8",
    "metacontroller.n_z=4",
    "metacontroller.gru_hidden=8",
    "metacontroller.embed_dim=8",
    "metacontroller.embed_width=8",
    "metacontroller.encoder_hidden=16",
    "metacontroller.switch_hidden=16",
    "metacontroller.decoder_hidden=8",
    "metacontroller.rank=4",
    "mctrain.batch_size=4",
    "mctrain.steps=4",
    "mctrain.cotrain_steps=4",
    "mctrain.alphas=(0.1,0.3)",
    "mctrain.eval_batches=1",
    "mctrain.trace_examples=2",
    "rl.episodes=16",
    "rl.batch_episodes=8",
    "rl.horizon=24",
    "rl.updates_per_call=2",
    "rl.policy_width=8",
    "reproduce.rl_seeds=2",
    "reproduce.cotrain_alphas=(0.3,)",
]


def _curve(method, seed, success):
    n = len(success)
    return dict(
        method=method,
        seed=seed,
        episodes=list(range(8, 8 * n + 1, 8)),
        success_rate=list(success),
        decisions_per_episode=[3.0] * n,
        wall_seconds=1.0,
    )


def test_final_success_and_quantiles():
    c = _curve("internal_rl", 0, [0.0] * 9 + [0.5])
    assert final_success(c, 0.1) == 0.5
    assert final_success(c, 0.2) == 0.25
    runs = [_curve("m", s, [s / 4] * 4) for s in range(5)]  # constant 0, .25, .5, .75, 1
    x, q25, med, q75 = quantile_curves(runs)
    np.testing.assert_array_equal(x, [8, 16, 24, 32])
    np.testing.assert_allclose(med, 0.5)
    np.testing.assert_allclose(q25, 0.25)
    np.testing.assert_allclose(q75, 0.75)
    summary = summarize_rl({"m": runs}, 0.5)["m"]
    assert summary["median"] == 0.5 and summary["episodes"] == 32


def test_report_from_stage_outputs(tmp_path):
    cfg = make_config("tiny")
    traces = dict(
        beta=[[0.9, 0.1, 0.8, 0.2]], subgoal=[[0, 0, 2, 2]], mask=[[True, True, True, True]]
    )
    metrics = dict(
        action_nll=0.4,
        kl=1.0,
        switches=2.0,
        subgoals_per_trajectory=2.0,
        switch_precision=1.0,
        switch_recall=1.0,
    )

    def mc_result(alpha, **kw):
        return dict(variant=dict(alpha=alpha, seed=0, **kw), metrics=metrics, traces=traces)

    parts = dict(
        pretrain=dict(heldout_action_acc=0.8, pretrain_task_success_rate=0.06),
        probe=dict(
            layers=[0, 1, 2],
            eval_accuracy=[0.3, 0.5, 0.45],
            train_accuracy=[0.3, 0.5, 0.5],
            chance=0.25,
            majority_baseline=0.27,
        ),
        metacontroller=dict(
            frozen=[mc_result(0.1), mc_result(0.3)],
            selected_alpha=0.1,
            beta1=mc_result(0.1),
            cotrained=[mc_result(0.1)],
            cotrained_alpha=0.1,
        ),
        rl={
            task: {m: [_curve(m, s, [0.1 * s, scale * s]) for s in range(3)] for m in RL_METHODS}
            for task, scale in (("heldout", 0.2), ("seen_transitions", 0.4))
        },
    )
    md, js = write_report(cfg, tmp_path, parts, preset="tiny", command="cmd", wall_seconds=1.0)
    results = json.loads(open(js).read())["results"]
    assert set(results["rl_final_success"]) == set(RL_METHODS)
    assert results["rl_final_success"]["internal_rl"] == pytest.approx(0.2)
    by_task = results["rl_final_success_by_task"]
    assert by_task["heldout"] == results["rl_final_success"]
    assert by_task["seen_transitions"]["internal_rl"] == pytest.approx(0.4)
    assert (tmp_path / "fig8_rl_success_seen_transitions.png").stat().st_size > 0
    assert results["probe_accuracy_by_layer"] == [0.3, 0.5, 0.45]
    text = open(md).read()
    assert "one fixed layout" in text  # the preset's documented deviations
    for fig in ("fig6_beta_traces.png", "fig7_rate_distortion.png", "fig8_rl_success.png"):
        assert (tmp_path / fig).stat().st_size > 0 and fig in text


@pytest.mark.slow
def test_reproduce_end_to_end_and_resume(tmp_path):
    args = ["reproduce", "--preset", "tiny", "--run-dir", str(tmp_path), "--quiet"]
    for o in REDUCED:
        args += ["--set", o]
    assert main(args) == 0
    results = json.loads((tmp_path / "results.json").read_text())["results"]
    assert set(results["rl_final_success"]) == set(RL_METHODS)
    # final success = the last update's success (10% of 2 updates, at least one), median
    # over the seeds' cached curves; each a fraction of the update's 8 episodes
    for method in RL_METHODS:
        curves = [
            json.loads((tmp_path / "rl" / f"{method}_seed{s}.json").read_text()) for s in range(2)
        ]
        for c in curves:
            assert len(c["success_rate"]) == 2
            np.testing.assert_allclose(
                np.multiply(c["success_rate"], 8),
                np.round(np.multiply(c["success_rate"], 8)),
                atol=1e-5,
            )
        assert results["rl_final_success"][method] == pytest.approx(
            np.median([c["success_rate"][-1] for c in curves]), abs=1e-12
        ), method
    assert len(results["probe_accuracy_by_layer"]) == 3
    rl_files = sorted(p.name for p in (tmp_path / "rl").iterdir())
    assert len(rl_files) == 2 * len(RL_METHODS)
    stamps = {p: p.stat().st_mtime_ns for p in (tmp_path / "rl").iterdir()}
    first = json.loads((tmp_path / "results.json").read_text())["provenance"]["compute"]
    assert main(args) == 0  # resumed: nothing is recomputed
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "rl").iterdir()} == stamps
    # the rebuilt report states the compute time of the first invocation, stage by stage
    again = json.loads((tmp_path / "results.json").read_text())["provenance"]["compute"]
    assert again["stages"] == first["stages"] and first["stages"]["rl"] > 0
    assert set(again["stages_from_cache"]) == set(first["stages"])
