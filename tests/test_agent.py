"""The agent loop: incremental token building, loss masks, context policies, parsing, broken envs."""

import time

import pytest
import torch

from rollmill.agent import AgentLoop
from rollmill.agent.chat import ChatFormat, parse_action
from rollmill.algos import POLICY_LOSSES, aggregate_loss
from rollmill.config import AgentConfig
from rollmill.envs import make_env
from rollmill.models.tiny import build_char_tokenizer, build_tiny_model
from rollmill.rollout import Completion, HFEngine, SamplingParams
from rollmill.rollout.engine import BatchEngine
from rollmill.train.batch import build_batch
from rollmill.train.trainer import completion_logprobs

OPTIMAL = ["down", "down", "right", "down", "right", "right"]


class ScriptedEngine(BatchEngine):
    """Every live episode gets the script's reply for the current turn (+ eos); records each call's prompts."""

    def __init__(self, tokenizer, script: list[str]):
        super().__init__()
        self.tokenizer, self.script, self.version, self.calls = tokenizer, script, 0, []

    def _run_batch(self, requests):
        text = self.script[len(self.calls)]
        self.calls.append([list(r.prompt_ids) for r in requests])
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"] + [self.tokenizer.eos_token_id]
        return [Completion(0, list(r.prompt_ids), ids, [-0.5] * len(ids), text, "stop", self.version, request_id=r.id)
                for r in requests]


@pytest.fixture
def tok():
    return build_char_tokenizer()


def loop_for(engine, tok, **agent):
    cfg = AgentConfig(**{"action_format": "raw", **agent})
    return AgentLoop(engine, tok, cfg, SamplingParams(max_new_tokens=8, temperature=1.0))


def test_scripted_optimal_episode_succeeds_and_trains_exactly_the_replies(tok):
    engine = ScriptedEngine(tok, OPTIMAL)
    traj = loop_for(engine, tok).play([make_env("frozenlake")], [0], [0], [0])[0]
    assert traj.success and traj.end_reason == "terminated" and traj.num_turns == 6 and traj.reward == 1.0
    assert len(traj.rows) == 1
    row = traj.rows[0]
    sampled = [tok(r, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for r in OPTIMAL]
    assert traj.trained_tokens() == [t for ids in sampled for t in ids]
    # every generation prompt is a prefix of the final sequence: nothing was re-tokenized
    context = row.prompt_ids + row.token_ids
    for call in engine.calls:
        assert context[: len(call[0])] == call[0]
    assert row.turn_of_token.count(-1) == row.mask.count(0)
    assert [row.turn_of_token[i] for i, m in enumerate(row.mask) if m] == [k for k, ids in enumerate(sampled) for _ in ids]


def test_appended_tokens_render_the_same_text_as_the_chat_template(tok):
    engine = ScriptedEngine(tok, OPTIMAL)
    loop = loop_for(engine, tok)
    traj = loop.play([make_env("frozenlake")], [0], [0], [0])[0]
    messages = [{"role": "system", "content": traj.info["system"]}, {"role": "user", "content": traj.initial_observation}]
    for t in traj.turns[:-1]:
        messages += [{"role": "assistant", "content": t.reply}, {"role": "user", "content": t.observation}]
    messages.append({"role": "assistant", "content": traj.turns[-1].reply})
    expected = tok.apply_chat_template(messages, tokenize=False)
    got = tok.decode(traj.rows[0].prompt_ids + traj.rows[0].token_ids)
    assert expected.startswith(got) and expected[len(got):] == "\n"  # the template's newline after the last eos


def test_reply_cut_by_length_gets_the_end_of_turn_as_env_text(tok):
    chat = ChatFormat(tok)
    no_eos = tok("do", add_special_tokens=False)["input_ids"]
    with_eos = no_eos + [tok.eos_token_id]
    assert chat.observation("x", no_eos)[0] == tok.eos_token_id
    assert chat.observation("x", with_eos)[0] != tok.eos_token_id


def test_invalid_actions_are_penalised_counted_and_leave_the_state(tok):
    engine = ScriptedEngine(tok, ["jump", "down", "fly"])
    traj = loop_for(engine, tok, max_turns=3, invalid_action_penalty=-0.25).play([make_env("frozenlake")], [0], [0], [0])[0]
    assert [t.invalid for t in traj.turns] == [True, False, True]
    assert [t.reward for t in traj.turns] == [-0.25, 0.0, -0.25]
    assert traj.turns[0].state == traj.turns[1].state != traj.turns[2].state
    assert traj.end_reason == "max_turns"


def test_unparsable_reply_is_invalid_without_calling_the_env(tok):
    calls = []

    class Counting:
        instructions = "count"

        def reset(self, seed=None):
            return "start", {}

        def step(self, action):
            calls.append(action)
            return "ok", 0.0, False, False, {}

    engine = ScriptedEngine(tok, ["no tags here", "<action>go</action>"])
    traj = loop_for(engine, tok, action_format="tag", max_turns=2).play([Counting()], [0], [0], [0])[0]
    assert calls == ["go"] and [t.invalid for t in traj.turns] == [True, False]


@pytest.mark.parametrize("fmt,reply,expected", [
    ("tag", "I go <action> left </action> now", "left"),
    ("tag", "<action></action>", None),
    ("tag", "left", None),
    ("json", 'ok <tool_call>{"name": "calculator", "arguments": {"expression": "2+3"}}</tool_call>',
     '{"name": "calculator", "arguments": {"expression": "2+3"}}'),
    ("json", '{"arguments": {}}', None),
    ("json", "<tool_call>{broken</tool_call>", None),
    ("raw", "  up \n", "up"),
    ("raw", "   ", None),
])
def test_parse_action(fmt, reply, expected):
    assert parse_action(reply, fmt) == expected


def test_sliding_window_starts_a_new_row_when_history_is_dropped(tok):
    engine = ScriptedEngine(tok, ["right", "left", "right", "left"])
    traj = loop_for(engine, tok, max_turns=4, context="sliding_window", window_turns=1).play(
        [make_env("frozenlake")], [0], [0], [0])[0]
    # turns 0-1 share the first row; from turn 2 on the oldest turn is dropped, so each turn is a row
    assert [t.row for t in traj.turns] == [0, 0, 1, 2]
    assert traj.trained_tokens() == [
        t for r in ["right", "left", "right", "left"] for t in tok(r, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]]
    third_prompt = tok.decode(traj.rows[1].prompt_ids)
    assert "left" in third_prompt and "right<|im_end|>" not in third_prompt.split("left")[0].split("assistant")[-1]


def test_truncate_observations_keeps_replies_and_omits_old_observations(tok):
    engine = ScriptedEngine(tok, ["right", "left", "right", "left"])
    traj = loop_for(engine, tok, max_turns=4, context="truncate_observations", window_turns=1).play(
        [make_env("frozenlake")], [0], [0], [0])[0]
    assert [t.row for t in traj.turns] == [0, 0, 0, 1]
    prompt = tok.decode(traj.rows[1].prompt_ids)
    assert prompt.count("(observation omitted)") == 1 and prompt.count("assistant\nright") == 2
    assert traj.initial_observation in prompt  # the task statement always stays


def test_plain_transcript_appends_observations_after_replies(tok):
    engine = ScriptedEngine(tok, ["d", "d"])
    traj = loop_for(engine, tok, max_turns=2, chat_template=False, system_prompt="", format_hint=False).play(
        [make_env("frozenlake", view="cell")], [0], [0], [0])[0]
    row = traj.rows[0]
    eos = tok.eos_token
    assert tok.decode(row.prompt_ids + row.token_ids, skip_special_tokens=False) == f"Ad{eos}\nEd{eos}"
    assert [t.state.split("|")[1] for t in traj.turns] == ["0,0", "1,0"]


def test_keep_all_ends_an_episode_that_outgrows_the_context(tok):
    engine = ScriptedEngine(tok, ["right", "left"] * 10)
    traj = loop_for(engine, tok, max_turns=20, max_context_tokens=400).play([make_env("frozenlake")], [0], [0], [0])[0]
    assert traj.end_reason == "context" and 0 < traj.num_turns < 20
    assert len(traj.rows[0].context) + 8 > 400  # the next turn would not have fit


class Broken:
    instructions = "broken"

    def __init__(self, mode):
        self.mode = mode

    def reset(self, seed=None):
        if self.mode == "bad_reset":
            return "start"  # not (observation, info)
        return "start", {}

    def step(self, action):
        if self.mode == "raise":
            raise RuntimeError("env exploded")
        if self.mode == "hang":
            time.sleep(5)
        return "fine", 1.0, True, False, {"success": True}


def test_broken_envs_fail_their_episode_and_others_go_on(tok):
    engine = ScriptedEngine(tok, ["go"])
    loop = AgentLoop(engine, tok, AgentConfig(action_format="raw"), SamplingParams(max_new_tokens=4), step_timeout_s=0.3)
    start = time.monotonic()
    trajs = loop.play([Broken("raise"), Broken("hang"), Broken("ok"), Broken("bad_reset")], [0, 1, 2, 3], [0, 1, 2, 3], [0, 1, 2, 3])
    assert time.monotonic() - start < 3
    assert [t.failed for t in trajs] == [True, True, False, True]
    assert trajs[3].end_reason == "env_error" and "reset" in trajs[3].error and trajs[3].num_turns == 0
    assert trajs[0].end_reason == "env_error" and "env exploded" in trajs[0].error
    assert trajs[1].end_reason == "env_timeout" and "0.3s" in trajs[1].error
    assert trajs[2].success and trajs[2].reward == 1.0


def test_env_tokens_never_receive_gradient(tok):
    """Gradient flows only through sampled tokens: d loss / d logp is 0 on env text, and changing
    anything the loss sees at env positions (advantage, behaviour logprob) changes no parameter grad."""
    torch.manual_seed(0)
    model = build_tiny_model(len(tok), seed=0)
    engine = HFEngine(model, tok)
    loop = AgentLoop(engine, tok, AgentConfig(action_format="raw", max_turns=3), SamplingParams(max_new_tokens=3))
    trajs = loop.play([make_env("frozenlake") for _ in range(2)], [0, 1], [0, 0], [1, 2])
    rows = [r for t in trajs for r in t.rows]
    advs = [[0.7 if m else 0.0 for m in r.mask] for r in rows]

    def grads(batch, leaf=False):
        model.zero_grad()
        logp, _ = completion_logprobs(model, batch)
        if leaf:
            logp = logp.detach().requires_grad_(True)
        out = POLICY_LOSSES["ppo_clip"](logp, logp.detach(), batch.token_advantages, mask=batch.mask, clip_eps=0.2)
        aggregate_loss(out.token_loss, batch.mask, mode="token-mean").backward()
        return logp.grad if leaf else torch.cat([p.grad.flatten() for p in model.parameters()])

    batch = build_batch(rows, advs, tok.pad_token_id)
    env_positions = (batch.mask == 0) & (batch.input_ids[:, batch.prompt_width:] != tok.pad_token_id)
    assert env_positions.any() and batch.mask.sum() > 0
    d_logp = grads(batch, leaf=True)
    assert torch.all(d_logp[batch.mask == 0] == 0) and torch.all(d_logp[batch.mask == 1] != 0)
    reference = grads(batch)
    noisy = build_batch(rows, advs, tok.pad_token_id)
    noisy.advantages = torch.where(noisy.mask == 0, torch.randn_like(noisy.advantages) * 100, noisy.advantages)
    noisy.behaviour_logprobs = torch.where(noisy.mask == 0, torch.randn_like(noisy.mask), noisy.behaviour_logprobs)
    assert torch.equal(grads(noisy), reference)
    # and the trained ids are the engine's sampled ids, in order
    sampled = batch.input_ids[:, batch.prompt_width:][batch.mask == 1].tolist()
    assert sampled == [t for tr in trajs for t in tr.trained_tokens()]


def scripted_generate(tok, script: list[str]):
    """An engine stand-in for one episode: reply k of the script at call k; records each prompt."""
    prompts = []

    async def generate(request):
        text = script[len(prompts)]
        prompts.append(list(request.prompt_ids))
        ids = tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        return Completion(0, list(request.prompt_ids), ids, [-0.5] * len(ids), text, "stop", 0,
                          request_id=request.id, versions=[0] * len(ids))

    return generate, prompts


def play_from(tok, prefix, boundary, script, env=None):
    import asyncio

    from rollmill.types import Trajectory

    generate, prompts = scripted_generate(tok, script)
    agent = loop_for(None, tok)
    traj = Trajectory(0, 1, 0)
    traj = asyncio.run(agent.run_episode(env or make_env("frozenlake"), traj, 0, 1, generate, prefix, boundary))
    return traj, prompts


def test_a_resampled_episode_replays_the_prefix_and_samples_only_after_the_boundary(tok):
    detour = ["down", "down", "left", "right", "down", "right", "right"]  # one wasted move, still solves it
    prefix, _ = play_from(tok, None, 0, detour)
    assert prefix.success and prefix.num_turns == 7
    traj, prompts = play_from(tok, prefix, 3, ["right", "down", "right", "right"])
    assert traj.success and [t.action for t in traj.turns] == detour[:3] + ["right", "down", "right", "right"]
    assert [t.observation for t in traj.turns[:3]] == [t.observation for t in prefix.turns[:3]]
    assert [t.reward for t in traj.turns[:3]] == [t.reward for t in prefix.turns[:3]]
    row, source = traj.rows[0], prefix.rows[0]
    # the first generation continues exactly the context episode 0 had before its turn 3
    before_turn_3 = source.turn_of_token.index(3)
    assert prompts[0] == source.prompt_ids + source.token_ids[:before_turn_3]
    assert row.token_ids[:before_turn_3] == source.token_ids[:before_turn_3]
    assert not any(row.mask[:before_turn_3])  # the prefix trains once, in episode 0
    sampled = [tok(r, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for r in ["right", "down", "right", "right"]]
    assert traj.trained_tokens() == [t for ids in sampled for t in ids]
    assert {row.turn_of_token[i] for i, m in enumerate(row.mask) if m} == {3, 4, 5, 6}


class Drifting:
    """An env whose answers depend on how often it was stepped since it was built, not on its seed."""

    instructions = "drift"

    def __init__(self):
        self.calls = 0

    def reset(self, seed=None):
        return "start", {}

    def step(self, action):
        self.calls += 1
        return f"call {self.calls}", 0.0, False, False, {}


def test_resampling_on_an_env_that_does_not_replay_fails_the_episode(tok):
    env = Drifting()
    prefix, _ = play_from(tok, None, 0, list("abcdefgh"), env=env)  # max_turns 8
    traj, prompts = play_from(tok, prefix, 2, ["x"], env=env)
    assert traj.failed and traj.end_reason == "env_error" and prompts == []
    assert "replay of turn 0 of episode 1: the env answered differently" in traj.error
