"""The demo's stage scheduler (toy/demo_schedule.py, `run_stages` through toy.demo's `Demo`): a
stage starts only after the stages it needs, independent stages run side by side up to `jobs`,
and a failure stops new starts, lets the running stages finish and is raised. No subprocess:
the stages are Python functions."""
import threading
import time

import pytest

from toy.demo import Demo, Mode, parallelism
from toy.demo_schedule import DemoError, Stage


def make_demo(tmp_path, jobs):
    return Demo(tmp_path / "work", tmp_path / "out", Mode("test"), tmp_path / "corpus", tmp_path / "models", jobs=jobs)


class Recorder:
    def __init__(self):
        self.lock = threading.Lock()
        self.events = []  # (time, "start" | "end", name)

    def stage(self, name, seconds=0.05, fail=False, after=()):
        def run(folder):
            with self.lock:
                self.events.append((time.perf_counter(), "start", name))
            time.sleep(seconds)
            if fail:
                raise DemoError(f"{name} failed")
            with self.lock:
                self.events.append((time.perf_counter(), "end", name))
        return Stage(name, run, after=after)

    def time(self, kind, name):
        return next(t for t, k, n in self.events if k == kind and n == name)

    def started(self):
        return {n for _, k, n in self.events if k == "start"}


def test_dependencies_respected_and_independent_stages_overlap(tmp_path):
    r = Recorder()
    stages = [r.stage("a"), r.stage("b", after=("a",)), r.stage("c", after=("a",)), r.stage("d", after=("b", "c"))]
    make_demo(tmp_path, jobs=2).run_stages(stages)
    assert r.time("start", "b") >= r.time("end", "a") and r.time("start", "c") >= r.time("end", "a")
    assert r.time("start", "d") >= max(r.time("end", "b"), r.time("end", "c"))
    assert r.time("start", "c") < r.time("end", "b")  # b and c ran side by side
    for name in "abcd":
        assert (tmp_path / "work" / name / "DONE").exists()


def test_one_job_runs_in_list_order(tmp_path):
    r = Recorder()
    make_demo(tmp_path, jobs=1).run_stages([r.stage("x"), r.stage("y"), r.stage("z", after=("x",))])
    assert [n for _, k, n in sorted(r.events) if k == "start"] == ["x", "y", "z"]


def test_failure_stops_new_starts_lets_running_finish_and_is_raised(tmp_path):
    r = Recorder()
    stages = [r.stage("slow", seconds=0.3), r.stage("bad", seconds=0.05, fail=True),
              r.stage("after_slow", after=("slow",)), r.stage("independent")]
    with pytest.raises(DemoError, match="bad failed"):
        make_demo(tmp_path, jobs=2).run_stages(stages)
    assert "slow" in {n for _, k, n in r.events if k == "end"}  # the running stage finished
    assert r.started() == {"slow", "bad"}  # nothing new started after the failure
    assert not (tmp_path / "work" / "bad" / "DONE").exists()


def test_a_stage_waiting_for_an_unknown_stage_is_a_bug_reported(tmp_path):
    r = Recorder()
    with pytest.raises(RuntimeError, match="never started"):
        make_demo(tmp_path, jobs=2).run_stages([r.stage("a"), r.stage("b", after=("missing",))])


def test_parallelism_defaults_and_bad_values():
    jobs, threads = parallelism(None, None)
    assert 1 <= jobs <= 4 and threads >= 1
    assert parallelism(3, 2) == (3, 2)
    assert parallelism(1, None)[0] == 1
    with pytest.raises(DemoError, match="at least 1"):
        parallelism(0, None)


def test_a_solo_stage_runs_alone_with_every_core(tmp_path):
    """A solo stage waits for the running ones, nothing starts beside it, and its entry points
    get jobs * threads torch threads (the others their share)."""
    r, seen = Recorder(), {}
    demo = Demo(tmp_path / "work", tmp_path / "out", Mode("test"), tmp_path / "corpus", tmp_path / "models",
                jobs=2, threads=3)

    def watching(stage):
        def run(folder):
            seen[stage.name] = demo._local.threads
            stage.run(folder)
        return Stage(stage.name, run, after=stage.after, solo=stage.solo)

    solo = r.stage("solo")
    stages = [r.stage("first", seconds=0.2), Stage("solo", solo.run, solo=True), r.stage("later"),
              r.stage("after_solo", after=("solo",))]
    demo.run_stages([watching(s) for s in stages])
    assert r.time("start", "solo") >= r.time("end", "first")  # waited for the running stage
    others = [n for n in ("first", "later", "after_solo")]
    for name in others:  # nothing overlapped it
        assert r.time("end", name) <= r.time("start", "solo") or r.time("start", name) >= r.time("end", "solo")
    assert seen == {"first": 3, "solo": 6, "later": 3, "after_solo": 3}


def test_every_evaluated_checkpoint_is_one_the_demo_names(tmp_path):
    """EVALUATED (which stage makes each checkpoint) and Demo.checkpoints() (where it lies) list the
    same names: a name in one only would be evaluated nowhere, silently."""
    from toy.demo import EVALUATED

    demo = make_demo(tmp_path, jobs=1)
    assert list(EVALUATED) == list(demo.checkpoints())
    plan = demo.plan()
    assert {s.name for s in plan} >= {f"eval_{name}" for name in EVALUATED}
    assert all(made_by in {s.name for s in plan} for made_by in EVALUATED.values() if made_by)
