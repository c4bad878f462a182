"""The Ray backend for real: a local head with 2 CPUs, the learner, a rollout worker and reward workers as
separate actors; the synchronous run equals the local one; a dead actor is named with the step."""

import os

import pytest
from reference_runs import run
from test_runtime import REFERENCE, assert_close

ray = pytest.importorskip("ray", reason="the Ray backend needs `pip install rollmill[ray]` (make test installs it)")

from rollmill.config import ConfigError, config_from_dict  # noqa: E402
from rollmill.runtime.loop import run_job  # noqa: E402
from rollmill.runtime.ray import RayRoles, RoleDied  # noqa: E402
from rollmill.runtime.rl import RLJob  # noqa: E402

pytestmark = pytest.mark.slow
ONE_THREAD = {"learner": {"threads": 1}, "rollout": {"threads": 1}}  # as the recorded run; Ray actors default to every core


@pytest.fixture
def ray_head():
    ray.init(num_cpus=2, include_dashboard=False, configure_logging=False)
    yield
    ray.shutdown()


def pid_of(actor) -> int:
    return ray.get(actor.__ray_call__.remote(lambda self: os.getpid()))


def test_sync_run_on_ray_actors_equals_the_local_run(ray_head, tmp_path, monkeypatch):
    """Learner, rollout worker and two reward workers each in their own process; samples, metrics and
    final weights are those of the recorded in-process run."""
    processes = {}
    close = RayRoles.close

    def record_then_close(self):
        processes.update(driver=os.getpid(), learner=pid_of(self.learner), rollout=pid_of(self.workers[0]),
                         rewards=tuple(pid_of(a) for a in self.rewards))
        close(self)

    monkeypatch.setattr(RayRoles, "close", record_then_close)
    new = run("rlvr", tmp_path / "run", runtime={"backend": "ray", "reward_workers": 2, **ONE_THREAD})
    pids = [processes["driver"], processes["learner"], processes["rollout"], *processes["rewards"]]
    assert len(set(pids)) == 5
    assert_close(new["samples"], REFERENCE["rlvr"]["samples"], "samples")
    assert_close(new["metrics"], REFERENCE["rlvr"]["metrics"], "metrics")
    assert_close(new["weights"]["abs_sums"], REFERENCE["rlvr"]["weights"]["abs_sums"], "weights")
    assert ray.is_initialized()  # a cluster the run joined is left running


def test_killing_the_rollout_actor_mid_step_names_the_actor_and_the_step(ray_head, tiny_cfg, tmp_path, monkeypatch):
    cfg = tiny_cfg(runtime={"backend": "ray", **ONE_THREAD}, train={"steps": 3}, eval={"before": False, "every": 0})
    poll = RayRoles.poll

    def kill_during_step_2(self, timeout, step):
        if step == 2:
            ray.kill(self.workers[0])
        return poll(self, timeout, step)

    monkeypatch.setattr(RayRoles, "poll", kill_during_step_2)
    with pytest.raises(RoleDied, match=r"rollout worker 0 \(Ray actor \w+\) died during step 2"):
        run_job(RLJob(cfg, tmp_path / "run", RayRoles), cfg, tmp_path / "run")


def test_ray_backend_without_ray_is_a_clear_config_error(monkeypatch, tmp_path):
    import builtins

    real_import = builtins.__import__

    def no_ray(name, *args, **kwargs):
        if name == "ray":
            raise ImportError("No module named 'ray'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_ray)
    with pytest.raises(ConfigError, match=r"runtime.backend.*needs Ray"):
        config_from_dict({"runtime": {"backend": "ray"}})


def test_async_run_on_ray_keeps_the_staleness_bound(ray_head, tiny_cfg, tmp_path):
    from rollmill.runtime import train
    from rollmill.track import read_jsonl

    cfg = tiny_cfg(runtime={"backend": "ray", **ONE_THREAD}, train={"steps": 4}, eval={"before": False, "every": 0},
                   **{"async": {"max_staleness": 1}})
    train(cfg, tmp_path / "run")
    records = [r for r in read_jsonl(tmp_path / "run" / "metrics.jsonl") if r["step"] > 0]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert all(r["async/staleness_max"] <= 1 for r in records)


def test_streamed_training_on_ray_samples_as_the_recorded_run(ray_head, tmp_path):
    """The learner actor takes the groups one call at a time as they complete (`add_groups`), and the
    update call returns only once every part ran: the run samples what the recorded one did, and its
    metrics agree up to the float summation order of the streamed update."""
    new = run("rlvr", tmp_path / "run", runtime={"backend": "ray", "streamed_training": True, **ONE_THREAD})
    assert_close(new["samples"], REFERENCE["rlvr"]["samples"], "samples", rel=1e-4)
    assert_close(new["metrics"], REFERENCE["rlvr"]["metrics"], "metrics", rel=1e-4)


@pytest.mark.parametrize("name", ["rlvr", "rlvr_critic"])
def test_two_data_parallel_learner_ranks_train_as_the_recorded_run(ray_head, tmp_path, name):
    """runtime.learner.ranks=2: two learner actors form a gloo group, shard the policy (and the critic) with
    FSDP2 and each train their half of every batch; samples, metrics and final weights are the
    one-process run's."""
    learner = {"threads": 1, "ranks": 2, "num_cpus": 0.5}
    new = run(name, tmp_path / "run", runtime={"backend": "ray", "reward_workers": 2, "rollout": {"threads": 1},
                                               "learner": learner})
    assert_close(new["samples"], REFERENCE[name]["samples"], "samples")
    assert_close(new["metrics"], REFERENCE[name]["metrics"], "metrics")
    assert_close(new["weights"]["abs_sums"], REFERENCE[name]["weights"]["abs_sums"], "weights")
