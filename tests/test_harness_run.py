"""An external harness inside a task sandbox, through the model proxy, becomes a trainable trajectory."""

from __future__ import annotations

import shutil
from dataclasses import replace

import pytest
from rollmill.config import AgentConfig
from rollmill.models import build_char_tokenizer, build_tiny_model
from rollmill.proxy import ModelProxy
from rollmill.rollout import Completion, HFEngine
from rollmill.sandbox import make_backend
from rollmill.terminal import builtin_tasks_dir, load_task
from rollmill.terminal.harness_run import run_harness_episode
from rollmill.train.agent_credit import token_advantages, turn_advantages
from rollmill.train.batch import build_batch

pytestmark = pytest.mark.skipif(shutil.which("bwrap") is None, reason="bubblewrap is not installed")


class ScriptedEngine:
    """Answers call k with replies[k], as sampled tokens with made-up log-probs."""

    version = 3

    def __init__(self, tokenizer, replies):
        self.tokenizer, self.replies, self.calls = tokenizer, list(replies), 0

    def generate(self, prompts, sampling, seed=None):
        text = self.replies[min(self.calls, len(self.replies) - 1)]
        self.calls += 1
        ids = self.tokenizer.encode(text, add_special_tokens=False)
        return [Completion(i, list(p), ids, [-0.25] * len(ids), text, "stop", self.version)
                for i, p in enumerate(prompts)]


@pytest.fixture
def backend(tmp_path):
    b = make_backend("bwrap", root=tmp_path / "sb")
    yield b
    b.close()


def serve(engine, tok, tmp_path):
    proxy = ModelProxy(engine, tok)
    return proxy, proxy.serve_unix(tmp_path / "model.sock")


def test_a_harness_that_solves_the_task_yields_reward_and_chunks(backend, tmp_path):
    tok = build_char_tokenizer()
    replies = ["I will write it.\n```bash\necho hello > hello.txt\n```", "finish"]
    proxy, socket_path = serve(ScriptedEngine(tok, replies), tok, tmp_path)
    task = load_task(builtin_tasks_dir() / "hello-file")
    try:
        episode = run_harness_episode(backend, proxy, socket_path, task, session="ep-0")
    finally:
        proxy.stop()
    assert episode.harness.ok, episode.harness.stderr
    assert episode.verdict.reward == 1.0
    traj = episode.trajectory
    assert traj.success and traj.num_turns == 2 and traj.reward == 1.0 and traj.oldest_version == 3
    for row, reply in zip(traj.rows, replies):
        assert tok.decode(row.token_ids) == reply and row.mask == [1] * len(row.token_ids)
        assert row.logprobs == [-0.25] * len(row.token_ids)
    assert traj.rows[1].prompt_ids[: len(traj.rows[0].prompt_ids)] == traj.rows[0].prompt_ids
    assert backend.list() == [] and proxy.calls("ep-0") == []

    failed = replace(traj, success=False, turns=[replace(t, reward=0.0) for t in traj.turns])
    agent = AgentConfig(credit="ipa")
    per_turn = turn_advantages([traj, failed], agent, scalar=None, group_size=2)
    rows = traj.rows + failed.rows
    advs = token_advantages(traj, per_turn[0]) + token_advantages(failed, per_turn[1])
    batch = build_batch(rows, advs, tok.pad_token_id)
    assert batch.size == 4 and int(batch.mask.sum()) == 2 * sum(len(r.token_ids) for r in traj.rows)
    assert set(batch.segments[batch.mask.bool()].tolist()) == {0, 1}  # one chunk per call
    assert float(per_turn[0][-1]) > float(per_turn[1][-1])


def test_a_random_policy_through_the_harness_still_gets_verified(backend, tmp_path):
    tok = build_char_tokenizer()
    proxy, socket_path = serve(HFEngine(build_tiny_model(len(tok), seed=1).eval(), tok), tok, tmp_path)
    task = load_task(builtin_tasks_dir() / "count-errors")
    try:
        episode = run_harness_episode(backend, proxy, socket_path, task, session="ep-1",
                                      env={"ROLLMILL_MAX_CALLS": "2", "ROLLMILL_MAX_TOKENS": "8"})
    finally:
        proxy.stop()
    assert episode.harness.ok, episode.harness.stderr
    assert episode.verdict.status.value == "ok" and episode.verdict.reward == 0.0
    assert 1 <= episode.trajectory.num_turns <= 2
    assert all(len(r.token_ids) == len(r.logprobs) > 0 for r in episode.trajectory.rows)
