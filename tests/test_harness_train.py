"""`rollmill train` through an external agent harness: `pipeline: agentic` with `env.name: harness`
plays each episode with the bundled mini agent in a task sandbox, through a per-episode model proxy
served by the rollout worker's engine, and trains on exactly the tokens the proxy recorded."""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import Mapping

import pytest
from conftest import tiny_config_dict

from rollmill.config import config_from_dict
from rollmill.envs import make_env
from rollmill.envs.harness import EpisodeEngine
from rollmill.models import build_char_tokenizer
from rollmill.pipelines.agentic import AgenticPipeline
from rollmill.proxy import ModelProxy
from rollmill.rollout import Completion, SamplingParams
from rollmill.rollout.sampling import request_seed
from rollmill.types import Trajectory

needs_bwrap = pytest.mark.skipif(shutil.which("bwrap") is None, reason="bubblewrap is not installed")


def harness_config(tmp_path):
    data = tiny_config_dict(
        tmp_path,
        env={"name": "harness", "eval_episodes": 1,
             "kwargs": {"names": ["hello-file"],
                        "harness_env": {"ROLLMILL_MAX_CALLS": "2", "ROLLMILL_MAX_TOKENS": "8"}}},
        agent={"max_context_tokens": 2048},
        rollout={"prompts_per_step": 1, "group_size": 2, "sampling": {"max_new_tokens": 6}},
        train={"steps": 1}, checkpoint={"every": 0}, eval={"every": 0, "before": False},
    )
    return config_from_dict({**data, "pipeline": "agentic"})


@needs_bwrap
def test_training_through_the_harness_uses_the_proxys_exact_tokens(tmp_path, monkeypatch):
    from rollmill.runtime import train
    from rollmill.track import read_jsonl

    episodes, trained = [], []  # each episode's calls as its proxy recorded them; what trained
    pop_calls, update = ModelProxy.pop_calls, AgenticPipeline.update

    def keep_calls(self, session):
        episodes.append(pop_calls(self, session))
        return episodes[-1]

    def keep_groups(self, learner, groups):
        trained.extend(t for g in groups for t in g)
        return update(self, learner, groups)

    monkeypatch.setattr(ModelProxy, "pop_calls", keep_calls)
    monkeypatch.setattr(AgenticPipeline, "update", keep_groups)
    train(harness_config(tmp_path), tmp_path / "run")

    records = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    step = next(r for r in records if r["step"] == 1)
    assert step["loss"] == step["loss"] and step["train/rows"] >= 2 and step["episode/failed"] == 0.0
    assert 1.0 <= step["episode/turns"] <= 2.0 and step["episode/success"] == 0.0

    tok = build_char_tokenizer()
    assert len(trained) == 2
    for traj in trained:
        assert traj.info["task"] == "hello-file" and traj.info["harness_exit_code"] == 0
        assert traj.reward == 0.0 and traj.oldest_version == 0
        # token-exact: row k is call k of one episode, prompt and sampled ids and log-probs unchanged
        rows = [(r.prompt_ids, r.token_ids, r.logprobs) for r in traj.rows]
        calls = next(e for e in episodes if rows == [(c.prompt_ids, c.choices[0].token_ids, c.choices[0].logprobs)
                                                     for c in e])
        assert 1 <= len(calls) == traj.num_turns <= 2
        for row, call in zip(traj.rows, calls):
            assert row.mask == [1] * len(row.token_ids) > [] and row.prompt_ids == chat_ids(tok, call.messages)
        assert traj.rows[-1].prompt_ids[: len(traj.rows[0].prompt_ids)] == traj.rows[0].prompt_ids
        for call, after in zip(calls, calls[1:]):  # the harness got back the text of the sampled tokens
            reply = next(m["content"] for m in after.messages[len(call.messages):] if m["role"] == "assistant")
            assert tok.decode(call.choices[0].token_ids, skip_special_tokens=True).startswith(reply)


def chat_ids(tok, messages) -> list[int]:
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    return list(ids["input_ids"] if isinstance(ids, Mapping) else ids)


def scripted_generate(tok, replies, requests):
    """The rollout worker's `generate` as an episode sees it: reply k to request k, versions filled."""

    async def generate(request):
        text = replies[min(len(requests), len(replies) - 1)]
        requests.append(request)
        ids = tok.encode(text, add_special_tokens=False)
        return Completion(0, list(request.prompt_ids), ids, [-0.5] * len(ids), text, "stop", 5, versions=[5] * len(ids))

    return generate


@needs_bwrap
def test_a_harness_episode_gets_the_verifier_reward_and_the_runs_sampling():
    tok = build_char_tokenizer()
    env = make_env("harness", names=["hello-file"], harness_env={"ROLLMILL_TEMPERATURE": "1.5"})
    replies, requests = ["```bash\necho hello > hello.txt\n```", "finish"], []
    sampling = SamplingParams(temperature=0.7, top_p=0.9, max_new_tokens=40, stop=("never",))
    traj = asyncio.run(env.run_episode(Trajectory(3, 1, 7, info={"env": "harness"}), 7, 99,
                                       scripted_generate(tok, replies, requests), tokenizer=tok,
                                       sampling=sampling, max_context_tokens=4096))
    assert (traj.group_id, traj.index, traj.prompt_id, traj.info["task"]) == (3, 1, 7, "hello-file")
    assert traj.success and traj.reward == 1.0 and traj.num_turns == 2 and not traj.failed
    assert [tok.decode(r.token_ids) for r in traj.rows] == replies and traj.versions == [5] * traj.sampled_tokens
    # the run's temperature and top-p, the harness's max_tokens (64) capped, its seeds replaced
    assert [(r.sampling.temperature, r.sampling.top_p, r.sampling.max_new_tokens, r.sampling.stop)
            for r in requests] == [(0.7, 0.9, 40, ())] * 2
    assert [r.seed for r in requests] == [request_seed(99, 0), request_seed(99, 1)]
    assert [r.prompt_ids for r in requests] == [tuple(row.prompt_ids) for row in traj.rows]


@needs_bwrap
def test_a_harness_that_never_calls_the_model_fails_its_episode(tmp_path):
    tok = build_char_tokenizer()
    script = tmp_path / "silent.py"
    script.write_text("print('nothing to do')\n")
    env = make_env("harness", names=["hello-file"], harness=str(script))
    traj = asyncio.run(env.run_episode(Trajectory(0, 0, 0, info={"env": "harness"}), 0, 1,
                                       scripted_generate(tok, ["finish"], []), tokenizer=tok,
                                       sampling=SamplingParams(), max_context_tokens=4096))
    assert traj.failed and traj.end_reason == "env_error" and "no model call" in traj.error


def test_the_episode_engine_refuses_what_training_cannot_use():
    tok = build_char_tokenizer()
    loop = asyncio.new_event_loop()
    engine = EpisodeEngine(scripted_generate(tok, ["x"], []), loop, SamplingParams(max_new_tokens=8), 0,
                           max_context_tokens=10)
    with pytest.raises(ValueError, match="n=1"):
        engine.generate([[1, 2]], SamplingParams(n=2))
    with pytest.raises(ValueError, match="max_context_tokens"):
        engine.generate([[1, 2, 3]], SamplingParams(max_new_tokens=100))
    engine.closed = True
    with pytest.raises(ValueError, match="episode is over"):
        engine.generate([[1]], SamplingParams(max_new_tokens=1))
    loop.close()


def test_a_missing_harness_script_is_a_config_error(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        make_env("harness", harness=str(tmp_path / "nope.py"))
