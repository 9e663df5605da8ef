"""benchmarks/timing.py: warm-up apart, median of the timed calls, background load from
/proc/stat (a fake file here, so the expected fractions are exact), contended calls retried."""

import importlib.util
import time
from pathlib import Path

import pytest

# benchmarks/ is a folder of scripts, not an installed package: import the module by path.
_PATH = Path(__file__).resolve().parents[2] / "benchmarks" / "timing.py"
_spec = importlib.util.spec_from_file_location("bench_timing", _PATH)
timing = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(timing)


def _stat_text(busy: int, total: int) -> str:
    """A /proc/stat whose aggregate line has `busy` user ticks and `total - busy` idle ticks
    (per-core and other lines present, as in the real file, and ignored)."""
    return (
        f"cpu  {busy} 0 0 {total - busy} 0 0 0 0 0 0\n"
        f"cpu0 {busy} 0 0 {total - busy} 0 0 0 0 0 0\n"
        "intr 12345 0 0\nctxt 999\n"
    )


class FakeStat:
    """A fake /proc/stat that advances by one (busy, total) tick delta per call of `tick`."""

    def __init__(self, path: Path, deltas):
        self.path, self.deltas = path, iter(deltas)
        self.busy, self.total = 1000, 5000
        self.path.write_text(_stat_text(self.busy, self.total))

    def tick(self, *_):
        db, dt = next(self.deltas)
        self.busy, self.total = self.busy + db, self.total + dt
        self.path.write_text(_stat_text(self.busy, self.total))


def test_read_cpu_ticks_counts_steal_as_busy_and_iowait_as_idle(tmp_path):
    p = tmp_path / "stat"
    # user nice system idle iowait irq softirq steal guest guest_nice
    p.write_text("cpu  10 2 3 40 5 6 7 8 9 1\ncpu0 1 1 1 1 1 1 1 1 1 1\n")
    busy = 10 + 2 + 3 + 6 + 7 + 8  # guest is already inside user
    assert timing.read_cpu_ticks(str(p)) == (busy, busy + 40 + 5)
    assert timing.read_cpu_ticks(str(tmp_path / "missing")) is None
    p.write_text("intr 1 2 3\n")
    assert timing.read_cpu_ticks(str(p)) is None


def test_background_load_subtracts_own_cpu_and_stays_in_unit_interval():
    # 500 busy ticks out of 1000; this process ran 1 s = 100 ticks of them
    assert timing.background_load((100, 1000), (600, 2000), 1.0, 100) == pytest.approx(0.4)
    assert timing.background_load((100, 1000), (600, 2000), 0.0, 100) == pytest.approx(0.5)
    # own CPU above the machine's busy time (tick rounding): clipped to 0, never negative
    assert timing.background_load((100, 1000), (600, 2000), 9.0, 100) == 0.0
    # an interval of a few ticks only: not measurable
    assert timing.background_load((100, 1000), (101, 1003), 0.0, 100) is None
    assert timing.background_load(None, (600, 2000), 0.0, 100) is None


def test_time_call_excludes_warmup_and_reports_median_of_sleeps(tmp_path):
    calls = []

    def fn():
        calls.append(None)
        time.sleep(0.3 if len(calls) == 1 else 0.05)  # the first call stands in for a compile

    rec = timing.time_call(fn, repeats=5, stat_path=str(tmp_path / "missing"))
    assert len(calls) == 6  # warm-up + 5, no retries without a load reading
    assert rec["compile_s"] >= 0.3
    assert len(rec["times_s"]) == rec["repeats"] == 5
    assert 0.05 <= rec["min_s"] <= rec["median_s"] <= rec["max_s"]
    # sleep overshoots by the scheduler's latency only; a warm-up leaking in would be 0.3 s
    assert rec["median_s"] < 0.05 + 0.05
    assert rec["spread_s"] == pytest.approx(rec["max_s"] - rec["min_s"])
    assert rec["load"] == [None] * 5 and rec["background_load"] is None


def test_time_call_waits_for_block_until_ready():
    class Pending:
        """Stands in for an async-dispatched array: ready only once waited for."""

        waited = 0

        def block_until_ready(self):
            Pending.waited += 1
            time.sleep(0.05)
            return self

    rec = timing.time_call(Pending, repeats=3, warmup=False, retries=0)
    assert rec["compile_s"] is None
    assert Pending.waited == 3
    assert rec["min_s"] >= 0.05


def test_time_call_custom_warmup_and_vary(tmp_path):
    seen = []
    rec = timing.time_call(
        lambda n: seen.append(n),
        repeats=3,
        warmup=lambda: seen.append("warm"),
        vary=lambda n: (n,),
        stat_path=str(tmp_path / "missing"),
    )
    # the custom warm-up takes call number 0; the timed calls get 1, 2, 3
    assert seen == ["warm", 1, 2, 3]
    assert rec["compile_s"] is not None


def test_contended_call_is_retried_and_least_contended_kept(tmp_path):
    # per call: warm-up; timed call 1 fully contended, its retry idle; timed call 2 idle
    stat = FakeStat(tmp_path / "stat", [(0, 0), (1000, 1000), (0, 1000), (0, 1000)])
    rec = timing.time_call(stat.tick, repeats=2, max_load=0.25, retries=2, stat_path=str(stat.path))
    assert rec["contended_retries"] == 1
    assert rec["load"] == [0.0, 0.0]
    assert rec["background_load"] == 0.0 and rec["load_max"] == 0.0

    # every attempt contended: after `retries` extra attempts the least contended one is kept
    stat = FakeStat(tmp_path / "stat", [(0, 0), (900, 1000), (500, 1000), (800, 1000)])
    rec = timing.time_call(stat.tick, repeats=1, max_load=0.25, retries=2, stat_path=str(stat.path))
    assert rec["contended_retries"] == 2
    # own CPU of a call that only writes a small file is well under one tick
    assert rec["load"][0] == pytest.approx(0.5, abs=0.01)
    assert all(0.0 <= x <= 1.0 for x in rec["load"])

    # a retry too short to measure is not known to be contended: it ends the retries and is kept
    stat = FakeStat(tmp_path / "stat", [(0, 0), (900, 1000), (0, 2)])
    rec = timing.time_call(stat.tick, repeats=1, max_load=0.25, retries=2, stat_path=str(stat.path))
    assert rec["contended_retries"] == 1 and rec["load"] == [None]

    # retries=0: a contended call is kept as it is
    stat = FakeStat(tmp_path / "stat", [(0, 0), (900, 1000)])
    rec = timing.time_call(stat.tick, repeats=1, retries=0, stat_path=str(stat.path))
    assert rec["contended_retries"] == 0
    assert rec["load"][0] == pytest.approx(0.9, abs=0.01)


def test_real_proc_stat_loads_are_fractions():
    rec = timing.time_call(lambda: time.sleep(0.2), repeats=2, warmup=False, retries=0)
    for x in rec["load"] + [rec["background_load"]]:
        assert x is None or 0.0 <= x <= 1.0


def test_scale_divides_times_not_loads(tmp_path):
    stat = FakeStat(tmp_path / "stat", [(0, 0), (400, 1000), (400, 1000)])
    rec = timing.time_call(stat.tick, repeats=2, retries=0, stat_path=str(stat.path))
    half = timing.scale(rec, 0.5)
    assert half["median_s"] == pytest.approx(rec["median_s"] / 2)
    assert half["times_s"] == pytest.approx([t / 2 for t in rec["times_s"]])
    assert half["compile_s"] == pytest.approx(rec["compile_s"] / 2)
    assert half["load"] == rec["load"] and half["repeats"] == 2


@pytest.mark.parametrize(
    "kwargs, word",
    [(dict(repeats=0), "repeats"), (dict(max_load=1.5), "max_load"), (dict(retries=-1), "retries")],
)
def test_bad_arguments_name_the_argument(kwargs, word):
    with pytest.raises(ValueError, match=word):
        timing.time_call(lambda: None, **kwargs)
