"""Shared, session-scoped fixtures for the spatia tests: one small scene, its frames and a memory.

Image sizes stay small (32 x 48, 48 x 64) so that each jitted function compiles once per worker.
"""

import numpy as np
import pytest

H, W = 32, 48


@pytest.fixture(scope="session")
def small_scene():
    """A room with two moving objects and an exploration trajectory of 6 frames at 32 x 48."""
    import jax.numpy as jnp

    from spatia import geometry as geo
    from spatia import scenes, trajectories

    scene = scenes.make_scene(7, n_dynamic=2)
    intr = geo.intrinsics_from_fov(H, W, 75.0)
    w2c = jnp.asarray(trajectories.exploration_trajectory(3, 6, scene=scene))
    frames = scenes.raycast_views(scene, w2c, intr, H, W)
    return dict(scene=scene, intr=intr, w2c=w2c, frames=frames)


@pytest.fixture(scope="session")
def rng():
    return np.random.default_rng(1234)
