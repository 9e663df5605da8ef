"""Linear probes: they recover a linearly decodable label and stay at chance on noise."""

import jax
import numpy as np

from common.train import OptimizerConfig
from internal_rl.probes import ProbeData, evaluate_probes, fit_probes


def _data(rng, n, dim=8):
    labels = rng.integers(0, 4, n).astype(np.int32)
    noise = rng.normal(size=(n, dim)).astype(np.float32)
    means = 3.0 * np.eye(4, dim, dtype=np.float32)
    informative = noise + means[labels] + 5.0  # offset: standardisation must handle it
    # layer 0: pure noise; layer 1: class means separate the labels
    feats = np.stack([rng.normal(size=(n, dim)).astype(np.float32), informative])
    seg_pos = rng.integers(0, 6, n).astype(np.int32)
    return ProbeData(feats, labels, seg_pos, seg_pos.copy())


def test_probe_decodes_informative_layer_only():
    rng = np.random.default_rng(0)
    train, test = _data(rng, 2000), _data(rng, 1000)
    params, losses = fit_probes(
        train,
        4,
        jax.random.key(0),
        steps=300,
        batch_size=256,
        optim=OptimizerConfig(learning_rate=3e-2, schedule="constant", grad_clip_norm=None),
    )
    assert losses[-10:].mean() < losses[:10].mean()
    res = evaluate_probes(params, test, max_position=4)
    acc = res["accuracy"]
    assert acc[1] > 0.9 and abs(acc[0] - 0.25) < 0.06
    # by-position bins pool positions >= 3 into the last bin and cover every token
    assert res["position_counts"].sum() == 1000 and res["accuracy_by_position"].shape == (2, 4)
    np.testing.assert_allclose(
        (res["accuracy_by_position"][1] * res["position_counts"]).sum() / 1000, acc[1], atol=1e-6
    )
