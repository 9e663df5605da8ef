"""The shared test contracts fail when they should (a contract that cannot fail tests nothing).

A toy "training run" keeps a counter and a parameter in a JSON checkpoint; no JAX compiles.
"""

import json

import numpy as np
import pytest

from tests.contracts import assert_decode_matches_forward, assert_resume_bit_exact


def _toy_run(resume_offset: float = 0.0, restart_count: bool = False):
    """run(directory, steps) -> {"w": f32 [2]}: w <- 0.9 w + step, checkpointed to JSON.
    Resume bugs: `resume_offset` perturbs the restored w; `restart_count` restores w but
    counts steps from 0 again."""

    def run(directory, steps):
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / "ckpt.json"
        start, w = 0, np.zeros(2, np.float32)
        if path.exists():
            saved = json.loads(path.read_text())
            start = 0 if restart_count else saved["step"]
            w = np.asarray(saved["w"], np.float32) + np.float32(resume_offset)
        for step in range(start, steps):
            w = np.float32(0.9) * w + np.float32(step)
        path.write_text(json.dumps({"step": steps, "w": w.tolist()}))
        return {"w": w}

    return run


def test_resume_contract_passes_a_faithful_resume(tmp_path):
    full, resumed = assert_resume_bit_exact(_toy_run(), tmp_path, kill_after=3, total=5)
    np.testing.assert_array_equal(full["w"], resumed["w"])


@pytest.mark.parametrize(
    "run",
    [_toy_run(resume_offset=1e-3), _toy_run(restart_count=True)],
    ids=["perturbed_restore", "restarted_count"],
)
def test_resume_contract_catches_a_broken_resume(run, tmp_path):
    with pytest.raises(AssertionError):
        assert_resume_bit_exact(run, tmp_path, kill_after=3, total=5)


def test_resume_contract_rejects_a_trivial_split_and_other_structures(tmp_path):
    run = _toy_run()
    # "interrupted" after it already finished: the equality would prove nothing
    with pytest.raises(AssertionError, match="prove nothing"):
        assert_resume_bit_exact(run, tmp_path / "a", kill_after=5, total=5)
    with pytest.raises(AssertionError, match="structure"):
        assert_resume_bit_exact(
            run,
            tmp_path / "b",
            kill_after=3,
            total=5,
            uninterrupted={"w": np.zeros(2, np.float32), "extra": 0},
        )
    with pytest.raises(AssertionError, match="dtype"):
        assert_resume_bit_exact(
            run,
            tmp_path / "c",
            kill_after=3,
            total=5,
            uninterrupted={"w": run(tmp_path / "d", 5)["w"].astype(float)},
        )


def _causal_cumsum():
    x = np.random.default_rng(0).normal(size=(2, 6, 3)).astype(np.float32)
    full = np.cumsum(x, axis=1)  # batch-major [B, T, D]
    steps = np.stack([full[:, t] for t in range(6)])  # time-major [T, B, D]
    return full, steps


def test_decode_contract():
    full, steps = _causal_cumsum()
    assert_decode_matches_forward({"y": full}, {"y": steps}, atol=1e-6, rtol=0.0)
    off_by_one = np.concatenate([steps[:1], steps[:-1]])  # a stale cache position
    with pytest.raises(AssertionError):
        assert_decode_matches_forward({"y": full}, {"y": off_by_one}, atol=1e-6, rtol=0.0)
    with pytest.raises(AssertionError, match="shape"):
        assert_decode_matches_forward({"y": full}, {"y": steps[:-1]}, atol=1e-6, rtol=0.0)
    constant = np.ones((2, 6, 3), np.float32)  # nothing depends on the position
    with pytest.raises(AssertionError, match="along time"):
        assert_decode_matches_forward(constant, np.swapaxes(constant, 0, 1), atol=1e-6, rtol=0.0)
