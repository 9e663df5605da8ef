"""The command line: a scene strip with camera files, config errors and malformed camera files."""

import numpy as np

from spatia import cli
from spatia import geometry as geo

SMALL = ["--set", "scene.height=32", "--set", "scene.width=48", "--set", "traj.n_frames=5"]


def test_scene_command_writes_strip_and_official_camera_files(tmp_path):
    out = tmp_path / "scene"
    assert cli.main(["scene", "--out", str(out), *SMALL]) == 0
    assert (out / "scene.png").stat().st_size > 1000 and (out / "config.json").exists()
    w2c = geo.read_w2c_file(out / "w2c.txt")
    assert w2c.shape == (5, 4, 4)
    np.testing.assert_allclose(w2c[0], w2c[-1])  # a loop returns to its start
    nintr = geo.read_intrinsics_file(out / "intrinsics.txt")
    assert 0.4 < nintr[2] < 0.6 and 0.4 < nintr[3] < 0.6


def test_bad_config_and_camera_files_fail_cleanly(tmp_path, capsys):
    assert cli.main(["render", "--out", str(tmp_path / "a"), "--set", "render.bogus=1"]) == 2
    err = capsys.readouterr().err
    assert "unknown config key 'render.bogus'" in err and "render.radius: float" in err
    bad = tmp_path / "w2c.txt"
    bad.write_text("1 2 3\n")
    assert cli.main(["render", "--out", str(tmp_path / "b"), "--w2c", str(bad), *SMALL]) == 2
    assert f"{bad}:1: expected a 3x4 or 4x4" in capsys.readouterr().err
