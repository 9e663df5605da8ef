import json

from common import runtime
from tests.common.test_config import ExpCfg


def test_start_run_dir_writes_config_and_keeps_command_history(tmp_path):
    run = tmp_path / "run"
    runtime.start_run_dir(run, ExpCfg())
    runtime.start_run_dir(run, ExpCfg(name="resumed"))
    assert json.loads((run / "config.json").read_text())["name"] == "resumed"
    assert len((run / "commands.txt").read_text().splitlines()) == 2
    assert not (run / "config.json.tmp").exists()
