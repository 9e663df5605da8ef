import io
import json

import numpy as np

from common import metrics, report


def test_metrics_writer_appends_and_survives_torn_line(tmp_path):
    path = tmp_path / "run" / "metrics.jsonl"
    with metrics.MetricsWriter(path) as w:
        w.write(1, {"loss": np.float32(2.5), "acc": 0.5})
        w.write(2, {"loss": float("nan")})
    with metrics.MetricsWriter(path) as w:  # a resumed run appends
        w.write(3, {"loss": 1.0})
    with open(path, "a") as f:
        f.write('{"step": 4, "lo')  # a kill mid-write
    records = metrics.read_metrics(path)
    assert [r["step"] for r in records] == [1, 2, 3]
    assert records[1]["loss"] == "nan"
    steps, values = metrics.metric_series(records, "acc")
    assert steps.tolist() == [1] and values.tolist() == [0.5]


def test_progress_excludes_first_step_from_rate(monkeypatch):
    clock = {"now": 100.0}  # a fake perf_counter, moved by hand
    monkeypatch.setattr(metrics.time, "perf_counter", lambda: clock["now"])
    stream = io.StringIO()
    progress = metrics.Progress(100, every_seconds=0.0, stream=stream, name="toy")
    clock["now"] = 107.0  # the first step (compiles) takes 7 s
    progress.update(1, {"loss": 0.25})
    assert progress.compile_seconds == 7.0
    assert "steps/s" not in stream.getvalue()  # no rate before steady state is measurable
    clock["now"] = 111.0  # 10 more steps in 4 s
    progress.update(11, force=True)
    line = stream.getvalue().strip().splitlines()[-1]
    # 2.5 steps/s from the first update on (11 / 11 s if the compile counted); ETA 89 / 2.5 s
    assert line == "[toy] step 11/100 | 2.50 steps/s | ETA 0m36s"
    assert progress.compile_seconds == 7.0  # measured once


def test_plot_and_report(tmp_path):
    png = metrics.plot_curves(
        {"a": ([0, 1, 2], [3.0, 2.0, 1.0])},
        tmp_path / "curve.png",
        hlines={"paper": 1.5},
        title="t",
    )
    assert open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    rep = report.Report("Toy reproduction", command="python -m toy reproduce --preset tiny")
    rep.paragraph("What ran.")
    rep.compare("Table 1", {"acc": 0.81234, "extra": None}, paper={"acc": 0.9, "only_paper": 1.0})
    rep.image("curve.png", "loss")
    md_path, json_path = rep.write(
        tmp_path, {"table1": {"acc": np.float32(0.5)}}, wall_seconds=12.0
    )
    md = open(md_path).read()
    assert "| acc | 0.812 | 0.9 |" in md and "| only_paper | — | 1 |" in md
    assert "python -m toy reproduce --preset tiny" in md and "wall time: 12 s" in md
    data = json.load(open(json_path))
    assert data["results"]["table1"]["acc"] == 0.5
    assert set(data["provenance"]) >= {
        "command",
        "git_revision",
        "date",
        "hardware",
        "wall_time_seconds",
    }
