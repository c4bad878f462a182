"""Asynchronous training: the staleness bound, and each mechanism of the runtime on its own
(rollout-train decoupling, refills, prompt replication, env-level asynchrony, redundant rollouts,
partial rollouts, the off-policy correction, checkpoints with samples in flight)."""

import asyncio
import itertools
import os
import time

import pytest
import torch
from conftest import tiny_config_dict
from reference_runs import CONFIGS, run
from test_runtime import REFERENCE, assert_close

from rollmill.agent import Agent
from rollmill.config import AgentConfig, config_from_dict
from rollmill.envs import ENVS, register_env
from rollmill.models import build_char_tokenizer, build_tiny_model
from rollmill.pipelines.agentic import EnvEpisodes
from rollmill.rollout import HFEngine, SamplingParams
from rollmill.rollout.driver import EngineDriver
from rollmill.rollout.engine import BatchEngine, Completion, Request
from rollmill.runtime import train
from rollmill.runtime.learner import Learner, effective_algorithm
from rollmill.runtime.queue import SampleQueue
from rollmill.runtime.worker import RolloutWorker
from rollmill.track import read_jsonl
from rollmill.train import PolicyTrainer
from rollmill.types import Row, Trajectory

_calls = itertools.count()


class Sleepy:
    """`turns` turns of anything; every `slow_every`-th step call anywhere sleeps `slow_s` (a heavy tail)."""

    instructions = "Say anything."

    def __init__(self, turns: int = 2, slow_every: int = 4, slow_s: float = 0.2):
        self.turns, self.slow_every, self.slow_s = turns, slow_every, slow_s

    def reset(self, seed=None):
        self.t = 0
        return f"seed {seed}", {"state": 0}

    def step(self, action):
        if next(_calls) % self.slow_every == 0:
            time.sleep(self.slow_s)
        self.t += 1
        return f"t{self.t}", float(len(action) % 2), self.t >= self.turns, False, {"state": self.t}


if "sleepy_test" not in ENVS:
    register_env("sleepy_test", "test env with a heavy tail of slow steps")(Sleepy)


def agentic_cfg(tmp_path, **sections):
    data = tiny_config_dict(
        tmp_path, env={"name": "sleepy_test", "eval_episodes": 2},
        agent={"max_turns": 3, "action_format": "raw", "chat_template": False, "system_prompt": "", "format_hint": False},
        rollout={"prompts_per_step": 2, "group_size": 2, "sampling": {"max_new_tokens": 3}},
        train={"steps": 5, "lr": 1e-3}, checkpoint={"every": 0}, eval={"before": False, "every": 0})
    for key, value in sections.items():
        data[key] = {**data.get(key, {}), **value}
    return config_from_dict({**data, "pipeline": "agentic"})


@pytest.fixture
def trained_batches(monkeypatch):
    """Every batch the policy trainer updates on: (the version it holds, the versions of its trained tokens)."""
    seen = []
    step = PolicyTrainer.step

    def spy(self, batch, ref_logp=None):
        seen.append((self.version, batch.versions[batch.mask > 0].tolist()))
        return step(self, batch, ref_logp)

    monkeypatch.setattr(PolicyTrainer, "step", spy)
    return seen


@pytest.mark.parametrize("k", [1, 2])
def test_no_trained_token_is_more_than_k_versions_old(k, tmp_path, trained_batches):
    cfg = agentic_cfg(tmp_path, **{"async": {"max_staleness": k}}, train={"steps": 6})
    train(cfg, tmp_path / "run")
    assert len(trained_batches) == 6
    lags = [version - v for version, versions in trained_batches for v in versions]
    assert lags and max(lags) <= k and min(lags) >= 0
    assert max(lags) >= 1  # rollout really ran ahead: this was not the synchronous algorithm


def test_rollout_goes_on_while_the_learner_trains_only_in_async_mode(tmp_path, monkeypatch):
    arrivals, training = [], []
    add, learn = SampleQueue.add, Learner.train

    def spy_add(self, traj):
        arrivals.append(time.monotonic())
        return add(self, traj)

    def slow_train(self, groups):
        start = time.monotonic()
        time.sleep(0.3)
        out = learn(self, groups)
        training.append((start, time.monotonic()))
        return out

    monkeypatch.setattr(SampleQueue, "add", spy_add)
    monkeypatch.setattr(Learner, "train", slow_train)
    during = {}
    for k in (0, 1):
        arrivals.clear(), training.clear()
        train(agentic_cfg(tmp_path, **{"async": {"max_staleness": k}}, train={"steps": 3}), tmp_path / f"k{k}")
        during[k] = sum(any(a < t < b for a, b in training) for t in arrivals)
    assert during[0] == 0 and during[1] > 0


def test_async_dynamic_sampling_refills_as_groups_are_dropped(tiny_cfg, tmp_path):
    cfg = tiny_cfg(**{"async": {"max_staleness": 1}}, rollout={"prompts_per_step": 2, "group_size": 2},
                   filters={"dynamic_sampling": True, "max_refill_rounds": 8}, train={"steps": 4},
                   eval={"before": False, "every": 0})
    train(cfg, tmp_path / "run")
    records = [r for r in read_jsonl(tmp_path / "run" / "metrics.jsonl") if r["step"] > 0]
    assert sum(r.get("filter/refilled_groups", 0) for r in records) > 0
    assert all(r["filter/kept_groups"] == 2 for r in records)


def test_prompt_replication_spreads_each_group_and_changes_no_sample(tmp_path, monkeypatch):
    """Two workers share every group's samples; samples depend on their seeds only, so the synchronous
    run is the recorded single-engine one."""
    placed = []
    submit = RolloutWorker.submit

    def spy(self, specs, lockstep):
        placed.extend((self.id, s.group_id, s.indices) for s in specs)
        return submit(self, specs, lockstep)

    monkeypatch.setattr(RolloutWorker, "submit", spy)
    new = run("rlvr", tmp_path / "run", runtime={"rollout_workers": 2}, **{"async": {"prompt_replication": True}})
    train_groups = {g for w, g, _ in placed}
    assert all({w for w, g, _ in placed if g == gid} == {0, 1} for gid in train_groups)
    assert_close(new["samples"], REFERENCE["rlvr"]["samples"], "samples", rel=1e-4)
    assert_close(new["metrics"], REFERENCE["rlvr"]["metrics"], "metrics", rel=1e-4)


class TurnEngine(BatchEngine):
    """Replies "go"; records, for every engine step, the turns its requests are at (read off the prompt)."""

    name, version = "turns", 0

    def __init__(self, tok):
        super().__init__()
        self.tok, self.batches = tok, []

    def _run_batch(self, requests):
        self.batches.append(sorted(self.tok.decode(list(r.prompt_ids)).count("go") for r in requests))
        ids = self.tok("go", add_special_tokens=False)["input_ids"]
        return [Completion(0, list(r.prompt_ids), ids, [-1.0] * len(ids), "go", "stop", 0, request_id=r.id)
                for r in requests]


@pytest.mark.parametrize("lockstep", [True, False])
def test_env_level_async_batches_turns_of_different_episodes_together(lockstep):
    tok = build_char_tokenizer()
    agent = Agent(tok, AgentConfig(action_format="raw", chat_template=False, system_prompt="", format_hint=False,
                                   max_turns=3), SamplingParams(max_new_tokens=2))
    engine = TurnEngine(tok)

    async def play():
        driver = EngineDriver(engine)
        envs = [Sleepy(turns=3, slow_every=1, slow_s=0.0), Sleepy(turns=3, slow_every=1, slow_s=0.15)]
        wave = driver.wave([0, 1]) if lockstep else None

        async def one(k):
            gen = (lambda r: driver.generate(r, wave, k)) if lockstep else driver.generate
            try:
                return await agent.run_episode(envs[k], Trajectory(0, k, 0), 0, k, gen)
            finally:
                if wave:
                    wave.leave(k)

        out = await asyncio.gather(one(0), one(1))
        await driver.close()
        return out

    trajs = asyncio.run(play())
    assert all(t.num_turns == 3 for t in trajs)
    mixed = any(len(set(b)) > 1 or len(b) == 1 for b in engine.batches)
    assert mixed != lockstep  # lockstep: every step holds turn t of both episodes
    if not lockstep:
        assert engine.batches[1] == [1]  # the fast episode's second turn did not wait for the slow env


def test_redundant_rollouts_keep_the_first_g_and_absorb_failed_and_slow_episodes(tmp_path, monkeypatch, trained_batches):
    run_episode = EnvEpisodes.run

    async def flaky(self, spec, index, ctx):
        if spec.eval:
            return await run_episode(self, spec, index, ctx)
        if index == 0:  # fails at once
            return Trajectory(spec.group_id, index, spec.prompt_id, failed=True, error="boom", end_reason="env_error")
        if index == 1:  # would hold the group up for a minute
            await asyncio.sleep(60)
        return await run_episode(self, spec, index, ctx)

    monkeypatch.setattr(EnvEpisodes, "run", flaky)
    kept = []
    update = Learner.train

    def spy(self, groups):
        kept.extend(sorted(t.index for t in g) for g in groups)
        return update(self, groups)

    monkeypatch.setattr(Learner, "train", spy)
    cfg = agentic_cfg(tmp_path, **{"async": {"redundant_episodes": 2}}, train={"steps": 2})
    start = time.monotonic()
    train(cfg, tmp_path / "run")
    assert time.monotonic() - start < 50  # the slow episodes were cancelled, not awaited
    assert kept == [[2, 3]] * 4  # 2 steps x 2 groups, each the two episodes that finished first
    records = [r for r in read_jsonl(tmp_path / "run" / "metrics.jsonl") if r["step"] > 0]
    assert all(r["groups/dropped_for_failure"] == 0 for r in records)


@pytest.mark.parametrize("mode", ["continue", "finish"])
def test_a_generation_in_flight_when_weights_arrive_finishes_or_continues_under_them(mode):
    tok = build_char_tokenizer()
    old, new = build_tiny_model(len(tok), seed=1).eval(), build_tiny_model(len(tok), seed=2).eval()
    sp = SamplingParams(temperature=1.0, max_new_tokens=24)
    request = Request(tuple(tok("hello there", add_special_tokens=False)["input_ids"]), sp, seed=5)
    reference = HFEngine(old, tok).run([request])[0]

    async def play():
        engine = HFEngine(build_tiny_model(len(tok), seed=1).eval(), tok)
        driver = EngineDriver(engine, partial=mode)
        pending = asyncio.ensure_future(driver.generate(request))
        while engine.stats.generated_tokens < 5:
            await asyncio.sleep(0.001)
        await driver.update_weights(new.state_dict(), 1)
        out = await pending
        await driver.close()
        return out, engine.version, driver.stats

    out, version, stats = asyncio.run(play())
    assert version == 1 and len(out.versions) == len(out.token_ids) == len(out.logprobs)
    if mode == "finish":
        assert out.versions == [0] * len(out.token_ids) and out.token_ids == reference.token_ids
    else:
        cut = out.versions.index(1)
        assert out.versions == [0] * cut + [1] * (len(out.token_ids) - cut) and cut >= 5 and stats.continued == 1
        assert out.token_ids[:cut] == reference.token_ids[:cut]  # what was sampled before the update is kept


def test_off_policy_correction_is_on_by_default_only_when_rollout_runs_ahead(tiny_cfg):
    assert effective_algorithm(tiny_cfg()).tis_cap is None
    assert effective_algorithm(tiny_cfg(**{"async": {"max_staleness": 1}})).tis_cap == 2.0
    assert effective_algorithm(tiny_cfg(**{"async": {"max_staleness": 1}}, algorithm={"tis_cap": 5.0})).tis_cap == 5.0
    assert effective_algorithm(tiny_cfg(**{"async": {"max_staleness": 2, "off_policy_correction": "none"}})).tis_cap is None
    decoupled = effective_algorithm(tiny_cfg(**{"async": {"max_staleness": 1, "off_policy_correction": "decoupled_ppo"}}))
    assert decoupled.loss == "decoupled_ppo"


def test_consistency_check_compares_only_tokens_of_the_trainers_own_version(tiny_cfg):
    tok = build_char_tokenizer()
    model = build_tiny_model(len(tok), seed=0)
    cfg = tiny_cfg()
    trainer = PolicyTrainer(model, cfg.train, cfg.algorithm)
    rows = [Row(list(tok("ab", add_special_tokens=False)["input_ids"])) for _ in range(2)]
    for row, version in zip(rows, (1, 0)):
        row.append_sampled([5, 6, 7], [0.0] * 3, [version] * 3, turn=0)
    from rollmill.train import build_batch

    batch = build_batch(rows, torch.zeros(2), tok.pad_token_id)
    with torch.no_grad():
        from rollmill.train import completion_logprobs

        exact, _ = completion_logprobs(model, batch)
    batch.behaviour_logprobs = torch.where(batch.versions == 1, exact, exact - 3.0)  # version 0: an older policy
    trainer.version = 1
    metrics = trainer.step(batch)
    assert metrics["logprob_mismatch"] < 1e-5 and metrics["logprob_mismatch_max"] < 1e-5


def test_async_resume_trains_every_step_once_and_no_group_twice(tmp_path, monkeypatch):
    trained = []
    update = Learner.train

    def spy(self, groups):
        trained.extend(g[0].group_id for g in groups)
        return update(self, groups)

    monkeypatch.setattr(Learner, "train", spy)
    cfg = agentic_cfg(tmp_path, **{"async": {"max_staleness": 1}}, train={"steps": 4}, checkpoint={"every": 2})
    half = cfg.model_copy(update={"train": cfg.train.model_copy(update={"steps": 2})})
    train(half, tmp_path / "run")
    train(cfg, tmp_path / "run", resume=True)
    assert [r["step"] for r in read_jsonl(tmp_path / "run" / "metrics.jsonl")] == [1, 2, 3, 4]
    assert len(trained) == 8 and len(set(trained)) == 8
    assert sorted(trained)[:4] == [0, 1, 2, 3]  # the groups in flight at the checkpoint were restarted


def test_reference_configs_also_run_asynchronously(tmp_path):
    for name in CONFIGS:
        out = run(name, tmp_path / name, **{"async": {"max_staleness": 1}})
        assert [m["step"] for m in out["metrics"]] == [0, 1, 2, 3]


def test_each_role_runs_its_own_thread_count_and_rollout_can_yield_the_cores(tmp_path, monkeypatch):
    """Thread counts and niceness are per thread: the engine's thread and the learner's each set their own."""
    seen = {"engine": set(), "learner": set()}
    step, learn = HFEngine.step, Learner.train

    def spy_step(self):
        seen["engine"].add((torch.get_num_threads(), os.getpriority(os.PRIO_PROCESS, 0)))
        return step(self)

    def spy_train(self, groups):
        out = learn(self, groups)
        seen["learner"].add((torch.get_num_threads(), os.getpriority(os.PRIO_PROCESS, 0)))
        return out

    monkeypatch.setattr(HFEngine, "step", spy_step)
    monkeypatch.setattr(Learner, "train", spy_train)
    nice = os.getpriority(os.PRIO_PROCESS, 0)
    runtime = {"learner": {"threads": 2}, "rollout": {"threads": 1}, "rollout_yields": True}
    try:
        train(agentic_cfg(tmp_path, **{"async": {"max_staleness": 1}}, train={"steps": 2}, runtime=runtime),
              tmp_path / "run")
    finally:
        torch.set_num_threads(1)  # setting a count anywhere also sets the default of threads started later
    assert seen == {"engine": {(1, min(19, nice + 19))}, "learner": {(2, nice)}}
    assert (torch.get_num_threads(), os.getpriority(os.PRIO_PROCESS, 0)) == (1, nice)  # the caller's are left alone
