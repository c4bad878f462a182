"""Tail batching (RollPacker): short rounds train what finishes first, the prompts they cut off wait in
the long-prompt queue and train together in a long round; nothing is lost or trained twice, also
across a resume."""

import asyncio
import pickle

import pytest

from rollmill.config import ConfigError, config_from_dict
from rollmill.pipelines.rlvr import PromptEpisodes
from rollmill.runtime.learner import Learner
from rollmill.runtime.local import LocalRoles
from rollmill.runtime.loop import run_job
from rollmill.runtime.queue import SampleQueue
from rollmill.runtime.rl import QUEUE_FILE, RLJob
from rollmill.track import read_jsonl
from rollmill.types import GroupSpec, Row, Trajectory

SLOW_S = 0.6


def tail_cfg(tiny_cfg, **sections):
    return tiny_cfg(task={"source": "arithmetic", "name": "add_1digit", "train_size": 12, "eval_size": 4},
                    rollout={"prompts_per_step": 2, "group_size": 4, "sampling": {"max_new_tokens": 4}},
                    tail_batching={"enabled": True, "prompt_factor": 1.5, "sample_factor": 1.5},
                    eval={"before": False, "every": 0}, **sections)


@pytest.fixture
def slow_prompts(monkeypatch):
    """Every third prompt's samples take SLOW_S (the long tail); records what each update trained."""
    run = PromptEpisodes.run
    trained = []

    async def slow(self, spec, index, ctx):
        if not spec.eval and spec.prompt_id % 3 == 0:
            await asyncio.sleep(SLOW_S)
        return await run(self, spec, index, ctx)

    learn, begin, add = Learner.train, Learner.begin_stream, Learner.add_groups

    def spy(self, groups):
        trained.append([(g[0].group_id, g[0].prompt_id, sorted(t.index for t in g)) for g in groups])
        return learn(self, groups)

    def spy_begin(self):
        trained.append([])
        return begin(self)

    def spy_add(self, groups):
        trained[-1].extend((g[0].group_id, g[0].prompt_id, sorted(t.index for t in g)) for g in groups)
        return add(self, groups)

    monkeypatch.setattr(PromptEpisodes, "run", slow)
    monkeypatch.setattr(Learner, "train", spy)
    monkeypatch.setattr(Learner, "begin_stream", spy_begin)
    monkeypatch.setattr(Learner, "add_groups", spy_add)
    return trained


def train_job(cfg, run_dir, resume=False) -> RLJob:
    job = RLJob(cfg, run_dir, LocalRoles)
    run_job(job, cfg, run_dir, resume=resume)
    return job


@pytest.mark.parametrize("streamed", [False, True], ids=["plain", "streamed"])
def test_short_rounds_defer_the_tail_and_a_long_round_trains_it_once(tiny_cfg, tmp_path, slow_prompts, streamed):
    cfg = tail_cfg(tiny_cfg, train={"steps": 8}, runtime={"streamed_training": streamed})
    job = train_job(cfg, tmp_path / "run")
    records = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    trained = [g for step in slow_prompts for g in step]
    ids = [gid for gid, _, _ in trained]
    assert len(ids) == 16 and len(set(ids)) == 16  # every step full, no group twice
    pending = {spec.group_id for spec in job.queue.long}
    assert not pending & set(ids)
    assert set(range(job.source.groups_started)) == set(ids) | pending  # none lost
    first_epoch = {pid for gid, pid, _ in trained if gid < 12} | {s.prompt_id for s in job.queue.long if s.group_id < 12}
    assert first_epoch == set(range(12))  # the epoch's prompts, each exactly once (ids are distinct)
    long_steps = [i for i, r in enumerate(records) if r["tail/long_round"] == 1.0]
    assert long_steps and sum(r["tail/deferred_prompts"] for r in records) >= 2
    for i in long_steps:  # long rounds: deferred (slow) prompts, all G samples run to the end
        assert all(pid % 3 == 0 and idx == [0, 1, 2, 3] for _, pid, idx in slow_prompts[i])
    short = [g for i, step in enumerate(slow_prompts) if i not in long_steps for g in step]
    assert sum(pid % 3 == 0 for _, pid, _ in short) < sum(pid % 3 != 0 for _, pid, _ in short)


def test_the_long_prompt_queue_survives_resume(tiny_cfg, tmp_path, slow_prompts):
    cfg = tail_cfg(tiny_cfg, train={"steps": 8}, checkpoint={"every": 1})
    half = cfg.model_copy(update={"train": cfg.train.model_copy(update={"steps": 3})})
    first = train_job(half, tmp_path / "run")
    saved = pickle.loads((tmp_path / "run" / "checkpoints" / "step_000003" / QUEUE_FILE).read_bytes())
    assert [s.group_id for s in saved["long"]] == [s.group_id for s in first.queue.long]
    job = train_job(cfg, tmp_path / "run", resume=True)
    assert [r["step"] for r in read_jsonl(tmp_path / "run" / "metrics.jsonl")] == list(range(1, 9))
    ids = [gid for step in slow_prompts for gid, _, _ in step]
    pending = {spec.group_id for spec in job.queue.long}
    assert len(ids) == 16 and len(set(ids)) == 16 and not pending & set(ids)
    assert set(range(job.source.groups_started)) == set(ids) | pending


def test_queue_defers_cut_off_groups_with_g_samples_and_hands_out_a_long_round(tiny_cfg):
    cfg = tail_cfg(tiny_cfg)
    queue = SampleQueue(cfg, drop_failed_groups=False)
    assert (queue.extra_groups, queue.extra_samples, queue.samples_per_group) == (1, 2, 6)
    specs = [GroupSpec(g, g, None, tuple(range(6))) for g in range(3)]
    queue.launched(specs, version=0)
    assert queue.abandon() == [0, 1, 2]
    assert [s.indices for s in queue.long] == [(0, 1, 2, 3)] * 3
    state = queue.state()
    assert [s.group_id for s in queue.long_round()] == [0, 1] and queue.long_round() == []
    restored = SampleQueue(cfg, drop_failed_groups=False)
    restored.load_state(state)
    assert [s.group_id for s in restored.long] == [0, 1, 2]


@pytest.mark.parametrize("sections, message", [
    ({"async": {"redundant_episodes": 2}}, "tail_batching.prompt_factor"),
    ({"async": {"env_async": False}}, "async.env_async"),
    ({"tail_batching": {"enabled": True, "prompt_factor": 0.5}}, "prompt_factor"),
])
def test_tail_batching_config_errors_name_the_key(sections, message):
    data = {"tail_batching": {"enabled": True}, **sections}
    with pytest.raises(ConfigError, match=message):
        config_from_dict(data)


def test_a_sample_of_the_cut_off_run_is_not_counted_for_the_relaunched_group(tiny_cfg):
    def sample(index: int, attempt: int) -> Trajectory:
        row = Row([1])
        row.append_sampled([5], [-1.0], [1], turn=0)
        return Trajectory(0, index, 0, [row], attempt=attempt)

    queue = SampleQueue(tail_cfg(tiny_cfg), drop_failed_groups=False)
    queue.launched([GroupSpec(0, 0, None, tuple(range(6)))], version=1)
    queue.abandon()
    again = queue.long.pop()
    assert again.attempt == 1
    queue.launched([again], version=1)  # sampled again (a worker's weights may still be those it ran on)
    assert queue.add(sample(5, attempt=0)) is None  # finished by the stopped run
    assert queue.inflight[0].trajs == []
    for i in range(4):
        done = queue.add(sample(i, attempt=1))
    assert done == 0 and [t.index for t in queue.ready[0]] == [0, 1, 2, 3]


def test_each_step_reports_how_full_the_engine_ran(tiny_cfg, make_job, tmp_path):
    cfg = tiny_cfg(rollout={"prompts_per_step": 2, "group_size": 4, "batch_size": 6, "sampling": {"max_new_tokens": 5}})
    job = make_job(cfg, tmp_path / "run")
    engine = job.roles.workers[0].engine
    rows0, steps0 = engine.stats.busy_row_steps, engine.stats.steps
    record, _ = job.train_step()
    rows, steps = engine.stats.busy_row_steps - rows0, engine.stats.steps - steps0
    assert steps > 0 and record["engine/rows_per_step"] == rows / steps
    assert record["engine/occupancy"] == rows / (steps * 6)
    assert 0 < record["engine/occupancy"] <= 1  # 8 samples on 6 rows: the batch was full for a while
    assert sum(n for n, _ in engine.stats.by_rows.values()) == engine.stats.steps
    assert max(engine.stats.by_rows) <= 6


def test_with_bounded_staleness_groups_that_cannot_train_in_time_wait_for_a_long_round(tiny_cfg, tmp_path,
                                                                                       slow_prompts):
    """Tail batching and k = 1 together: a slow group is cut once it can train in no later update (not
    run on to be dropped as stale), waits in the long-prompt queue, and its long round trains it; no
    group trains twice, none is lost, none goes stale."""
    cfg = tail_cfg(tiny_cfg, train={"steps": 10}, **{"async": {"max_staleness": 1}})
    job = train_job(cfg, tmp_path / "run")
    records = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    ids = [gid for step in slow_prompts for gid, _, _ in step]
    assert len(ids) == 20 and len(set(ids)) == 20
    assert not any(r.get("async/stale_groups") for r in records)
    assert sum(r["tail/deferred_prompts"] for r in records) >= 2
    long_steps = [i for i, r in enumerate(records) if r["tail/long_round"] == 1.0]
    assert long_steps
    for i in long_steps:  # a long round's groups are cut-off slow prompts, with all G samples to the end
        assert any(pid % 3 == 0 and idx == [0, 1, 2, 3] for _, pid, idx in slow_prompts[i])
    left = {s.group_id for s in job.queue.long} | set(job.queue.inflight) | set(job.queue.ready)
    assert not left & set(ids)
    assert set(range(job.source.groups_started)) == set(ids) | left  # none lost


def test_a_synchronous_surplus_group_waits_for_a_long_round_instead_of_going_stale(tiny_cfg):
    """Groups completing together can overfill a synchronous step; the surplus was sampled with weights
    no later update may train on, so its prompt is deferred (sampled again), not lost."""
    def group(gid: int) -> list[Trajectory]:
        out = []
        for i in range(4):
            row = Row([1])
            row.append_sampled([5], [-1.0], [0], turn=0)
            out.append(Trajectory(gid, i, gid, [row]))
        return out

    queue = SampleQueue(tail_cfg(tiny_cfg), drop_failed_groups=False)
    queue.launched([GroupSpec(g, g, None, tuple(range(6))) for g in range(3)], version=0)
    for gid in range(3):
        for traj in group(gid):
            queue.add(traj)
    data = queue.take(0, force=True)
    assert [g[0].group_id for g in data.groups] == [0, 1] and not queue.ready
    assert [(s.group_id, s.attempt) for s in queue.long] == [(2, 1)] and data.counts["tail/deferred_prompts"] == 1.0
