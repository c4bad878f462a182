"""`rollmill train` through an external agent harness: `pipeline: agentic` with `env.name: harness`
plays each episode with the bundled mini agent in a task sandbox, through a per-episode model proxy
served by the rollout worker's engine, and trains on exactly the tokens the proxy recorded."""

from __future__ import annotations

import shutil
from collections.abc import Mapping

import pytest
from conftest import tiny_config_dict

from rollmill.config import config_from_dict
from rollmill.models import build_char_tokenizer
from rollmill.pipelines.agentic import AgenticPipeline
from rollmill.proxy import ModelProxy

pytestmark = pytest.mark.skipif(shutil.which("bwrap") is None, reason="bubblewrap is not installed")


def harness_config(tmp_path):
    data = tiny_config_dict(
        tmp_path,
        env={"name": "harness", "eval_episodes": 1,
             "kwargs": {"names": ["hello-file"], "harness_env": {"ROLLMILL_MAX_CALLS": "2", "ROLLMILL_MAX_TOKENS": "8"}}},
        agent={"max_context_tokens": 2048},
        rollout={"prompts_per_step": 1, "group_size": 2, "sampling": {"max_new_tokens": 6}},
        train={"steps": 1}, checkpoint={"every": 0}, eval={"every": 0, "before": False},
    )
    return config_from_dict({**data, "pipeline": "agentic"})


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
    assert "train/loss" in step and step["episode/failed"] == 0.0
    assert 1.0 <= step["episode/turns"] <= 2.0 and step["episode/success"] == 0.0

    tok = build_char_tokenizer()
    assert len(trained) == 2
    for traj in trained:
        assert traj.info["task"] == "hello-file" and traj.reward == 0.0 and traj.oldest_version == 0
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
