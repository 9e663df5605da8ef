"""The data-parallel train step gives the same parameters on 1 device and split across two
processes joined by jax.distributed (the 8-device mesh is tested through
`common.train.run_stage` in tests/common/test_stage.py)."""

import os
import pathlib
import socket
import subprocess
import sys

import numpy as np
import pytest

from common import distributed

WORKER = pathlib.Path(__file__).with_name("distributed_worker.py")
ROOT = WORKER.parents[2]


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "XLA_"))}
    env.update(PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu", **extra)
    return env


def _run(mode, out, **extra):
    return subprocess.Popen(
        [sys.executable, str(WORKER), mode, str(out)],
        env=_env(**extra),
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _finish(proc, timeout=240):
    output, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, output[-3000:]


def _load(path):
    data = np.load(path)
    return [data[f"arr_{i}"] for i in range(len(data.files) - 1)], float(data["loss"])


@pytest.fixture(scope="module")
def single_device_result(tmp_path_factory):
    out = tmp_path_factory.mktemp("single") / "params.npz"
    _finish(_run("single", out))
    return _load(out)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_match_one_process(single_device_result, tmp_path):
    port = _free_port()
    out = tmp_path / "multihost.npz"
    procs = [
        _run(
            "multihost",
            out,
            JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
            JAX_NUM_PROCESSES="2",
            JAX_PROCESS_ID=str(i),
        )
        for i in range(2)
    ]
    for proc in procs:
        _finish(proc)
    params, loss = _load(out)
    ref_params, ref_loss = single_device_result
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    for got, want in zip(params, ref_params, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_mesh_and_batch_placement_errors():
    mesh = distributed.make_mesh()
    assert dict(mesh.shape) == {distributed.DATA_AXIS: 1, distributed.MODEL_AXIS: 1}
    with pytest.raises(ValueError, match="does not match 1 devices"):
        distributed.make_mesh(data=2)
    placed = distributed.place_batch({"x": np.ones((4, 2), np.float32)}, mesh)
    assert placed["x"].sharding == distributed.batch_sharding(mesh)


def test_initialize_is_a_noop_without_coordinator(monkeypatch):
    for key in ("JAX_COORDINATOR_ADDRESS", "COORDINATOR_ADDRESS", "JAX_DISTRIBUTED_AUTO"):
        monkeypatch.delenv(key, raising=False)
    assert distributed.maybe_initialize_distributed() is False
