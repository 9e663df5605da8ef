"""`python -m internal_rl pretrain` as two processes joined by jax.distributed (the
coordinator variables of `common.distributed.maybe_initialize_distributed`, gloo CPU
collectives, one CPU device each) trains the parameters of the same command run as one
process; the parameters are read back from each run's checkpoints."""

import json
import os
import pathlib
import socket
import subprocess
import sys

from flax import nnx

from internal_rl.config import make_config
from internal_rl.pretrain import load_base_model
from tests.multidevice import assert_params_close, flat_params

ROOT = pathlib.Path(__file__).resolve().parents[2]
# batch 4: two rows per process; evaluation (held-out batch and closed-loop episodes) on
SETS = [
    "data.batch_size=4",
    "data.max_len=24",
    "model.dim=16",
    "model.depth=2",
    "model.num_heads=2",
    "model.mlp_hidden=32",
    "pretrain.steps=3",
    "pretrain.optim.total_steps=3",
    "pretrain.log_every=1",
    "pretrain.save_every=3",
    "pretrain.eval_every=0",
    "pretrain.eval_episodes=4",
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(run_dir: pathlib.Path, **env_vars) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "XLA_"))}
    env.update(PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu", **env_vars)
    cmd = [
        sys.executable,
        "-m",
        "internal_rl",
        "pretrain",
        "--preset",
        "tiny",
        "--quiet",
        "--run-dir",
        str(run_dir),
    ]
    for s in SETS:
        cmd += ["--set", s]
    return subprocess.Popen(
        cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def _finish(proc: subprocess.Popen, timeout: float = 300) -> None:
    output, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, output[-4000:]


def test_two_process_cli_pretraining_matches_one_process(tmp_path):
    port = _free_port()
    pair = [
        _launch(
            tmp_path / "two",
            JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
            JAX_NUM_PROCESSES="2",
            JAX_PROCESS_ID=str(i),
        )
        for i in range(2)
    ]
    # the one-process reference: the same verb, in this process, while the pair runs
    from internal_rl.__main__ import main

    args = ["pretrain", "--preset", "tiny", "--quiet", "--run-dir", str(tmp_path / "one")]
    assert main(args + [a for s in SETS for a in ("--set", s)]) == 0
    for proc in pair:
        _finish(proc)

    cfg = make_config("tiny", SETS)
    one = flat_params(nnx.state(load_base_model(cfg, tmp_path / "one"), nnx.Param))
    two = flat_params(nnx.state(load_base_model(cfg, tmp_path / "two"), nnx.Param))
    # float32: the two-process step all-reduces per-process gradient partials (gloo) in
    # another order than one device sums them (≈1e-7 relative); three Adam steps of lr 1e-3
    # keep the parameter difference near 1e-6
    assert_params_close(two, one, rtol=1e-4, atol=1e-5)
    for run in ("one", "two"):  # process 0 wrote the run directory's records, once
        summary = json.loads((tmp_path / run / "pretrain" / "summary.json").read_text())
        assert summary["step"] == 3
        lines = (tmp_path / run / "pretrain" / "metrics.jsonl").read_text().splitlines()
        records = [json.loads(x) for x in lines]
        assert [r["step"] for r in records if "loss" in r] == [1, 2, 3]
    assert json.loads((tmp_path / "two" / "config.json").read_text())["data"]["batch_size"] == 4
