"""Native tool calling: schemas rendered by the chat template, calls parsed from the model's own
format, results in the `tool` role; in the agent loop (token-exact) and through the model proxy."""

from __future__ import annotations

import json

import openai
import pytest

from rollmill.agent import AgentLoop
from rollmill.agent.tools import TOOLS_PREAMBLE, parse_tool_calls, renders_tools
from rollmill.config import AgentConfig
from rollmill.envs import make_env
from rollmill.models import build_char_tokenizer
from rollmill.proxy import ModelProxy
from rollmill.rollout import Completion, SamplingParams

from test_agent import ScriptedEngine

# A Hermes/Qwen-like template: tools in the system turn, tool results as <tool_response> in a user turn.
HERMES_TEMPLATE = (
    "{%- if tools %}<|im_start|>system\n{% if messages[0]['role'] == 'system' %}{{ messages[0]['content'] }}\n\n"
    "{% endif %}# Tools\n<tools>\n{% for t in tools %}{{ t | tojson }}\n{% endfor %}</tools><|im_end|>\n"
    "{% elif messages[0]['role'] == 'system' %}<|im_start|>system\n{{ messages[0]['content'] }}<|im_end|>\n{% endif %}"
    "{%- for m in messages %}{% if m['role'] == 'system' %}"
    "{% elif m['role'] == 'tool' %}<|im_start|>user\n<tool_response>\n{{ m['content'] }}\n</tool_response><|im_end|>\n"
    "{% elif m['role'] == 'assistant' %}<|im_start|>assistant\n{{ m['content'] or '' }}"
    "{% for c in m['tool_calls'] or [] %}<tool_call>\n{\"name\": \"{{ c['function']['name'] }}\", "
    "\"arguments\": {{ c['function']['arguments'] | tojson }}}\n</tool_call>{% endfor %}<|im_end|>\n"
    "{% else %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SEED = 3


@pytest.fixture(scope="module")
def hermes_tok():
    tok = build_char_tokenizer()
    tok.chat_template = HERMES_TEMPLATE
    return tok


def call_text(name: str, arguments: dict) -> str:
    return f'<tool_call>\n{json.dumps({"name": name, "arguments": arguments})}\n</tool_call>'


def calculator_script(seed: int) -> list[str]:
    env = make_env("calculator", native_tools=True)
    question, _ = env.reset(seed)
    expression = question.removeprefix("What is ").removesuffix("?")
    return [call_text("calculator", {"expression": expression}), call_text("answer", {"value": env.truth})]


def opening(traj) -> list[dict]:
    return [{"role": "system", "content": traj.info["system"]}, {"role": "user", "content": traj.initial_observation}]


def play(tok, script):
    engine = ScriptedEngine(tok, script)
    loop = AgentLoop(engine, tok, AgentConfig(action_format="json", max_turns=3), SamplingParams(max_new_tokens=80))
    return engine, loop.play([make_env("calculator", native_tools=True)], [SEED], [0], [0])[0]


def test_parse_tool_calls_keeps_the_text_outside_and_skips_malformed_calls():
    text = 'Let me add.<tool_call>{"name": "add", "parameters": {"a": 1}}</tool_call> <tool_call>{oops}</tool_call>'
    content, calls = parse_tool_calls(text, id_prefix="c")
    assert calls == [{"id": "c0", "type": "function", "function": {"name": "add", "arguments": '{"a": 1}'}}]
    assert content == "Let me add. <tool_call>{oops}</tool_call>"
    assert parse_tool_calls(call_text("f", {}))[0] is None  # nothing outside the call: null content


def test_tool_episode_renders_schemas_parses_calls_and_stays_token_exact(hermes_tok):
    tok = hermes_tok
    assert renders_tools(tok)
    script = calculator_script(SEED)
    engine, traj = play(tok, script)
    assert traj.success and traj.end_reason == "terminated" and traj.num_turns == 2

    first_prompt = tok.decode(engine.calls[0][0])
    assert "# Tools\n<tools>\n" in first_prompt and '"name": "calculator"' in first_prompt
    assert TOOLS_PREAMBLE[:20] not in first_prompt  # the template rendered them, not the fallback
    call = traj.info["tool_calls"][0]
    assert call["function"]["name"] == "calculator" and call["id"] == "call_0_0"
    arguments = json.loads(call["function"]["arguments"])
    assert traj.turns[0].action == json.dumps({"name": "calculator", "arguments": arguments})
    assert traj.turns[0].observation.startswith("calculator result: ")
    # the result came back in the tool role, as the template renders it
    second_prompt = tok.decode(engine.calls[1][0])
    assert second_prompt.endswith(f"<tool_response>\n{traj.turns[0].observation}\n</tool_response><|im_end|>\n"
                                  "<|im_start|>assistant\n")

    (row,) = traj.rows
    sampled = [tok(r, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for r in script]
    assert traj.trained_tokens() == [t for ids in sampled for t in ids]
    context = row.prompt_ids + row.token_ids
    for prompts in engine.calls:  # every generation prompt is a prefix: nothing was re-tokenized
        assert context[: len(prompts[0])] == prompts[0]
    messages = [*opening(traj), {"role": "assistant", "content": script[0]},
                {"role": "tool", "content": traj.turns[0].observation, "tool_call_id": call["id"],
                 "name": "calculator"},
                {"role": "assistant", "content": script[1]}]
    expected = tok.apply_chat_template(messages, tools=make_env("calculator", native_tools=True).tools, tokenize=False)
    assert expected == tok.decode(context) + "\n"  # the template's newline after the last eos


def test_template_without_tools_gets_them_in_the_system_message():
    tok = build_char_tokenizer()  # its ChatML template renders no tools
    assert not renders_tools(tok)
    engine, traj = play(tok, calculator_script(SEED))
    assert traj.success
    first_prompt = tok.decode(engine.calls[0][0])
    assert "<tools>\n" in first_prompt and '"name": "answer"' in first_prompt
    assert tok.decode(engine.calls[1][0]).endswith(f"<|im_start|>tool\n{traj.turns[0].observation}<|im_end|>\n"
                                                    "<|im_start|>assistant\n")


def test_plain_transcript_gets_the_tools_in_its_system_text():
    tok = build_char_tokenizer()
    engine = ScriptedEngine(tok, calculator_script(SEED))
    loop = AgentLoop(engine, tok, AgentConfig(action_format="json", chat_template=False),
                     SamplingParams(max_new_tokens=80))
    traj = loop.play([make_env("calculator", native_tools=True)], [SEED], [0], [0])[0]
    assert traj.success and "<tools>\n" in tok.decode(engine.calls[0][0])


def test_envs_without_tools_are_unchanged(hermes_tok):
    engine = ScriptedEngine(hermes_tok, [call_text("answer", {"value": 1})])
    loop = AgentLoop(engine, hermes_tok, AgentConfig(action_format="json"), SamplingParams(max_new_tokens=80))
    traj = loop.play([make_env("calculator")], [SEED], [0], [0])[0]
    messages = opening(traj)
    assert engine.calls[0][0] == hermes_tok(hermes_tok.apply_chat_template(messages, tokenize=False,
                                            add_generation_prompt=True), add_special_tokens=False)["input_ids"]
    assert "tool_calls" not in traj.info and traj.turns[0].action is not None  # parsed by action_format


class FixedReplyEngine:
    """Answers every prompt with the same text (+ eos), keeping the prompts it got."""

    name, version = "fixed", 0

    def __init__(self, tok, text: str):
        self.ids = tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        self.text, self.prompts = text, []

    def generate(self, prompts, sampling, seed=None):
        self.prompts += prompts
        return [Completion(0, list(p), list(self.ids), [-0.25] * len(self.ids), self.text, "stop", 0)
                for p in prompts for _ in range(sampling.n)]


WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}
REPLY = "Checking." + call_text("get_weather", {"city": "Paris"})


@pytest.fixture
def served(hermes_tok):
    engine = FixedReplyEngine(hermes_tok, REPLY)
    proxy = ModelProxy(engine, hermes_tok, model_name="tiny")
    url = proxy.serve()
    yield proxy, engine, openai.OpenAI(base_url=url + "/v1", api_key="x")
    proxy.stop()


def test_openai_client_gets_tool_calls_and_sends_tool_results(served, hermes_tok):
    proxy, engine, client = served
    messages = [{"role": "user", "content": "Weather in Paris?"}]
    reply = client.chat.completions.create(model="tiny", messages=messages, tools=[WEATHER], tool_choice="auto")
    (choice,) = reply.choices
    assert choice.finish_reason == "tool_calls" and choice.message.content == "Checking."
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris"}
    assert '"name": "get_weather"' in hermes_tok.decode(engine.prompts[0])

    # the call and its result go back as OpenAI messages; the template renders both
    messages += [choice.message.model_dump(exclude_none=True),
                 {"role": "tool", "tool_call_id": call.id, "content": "sunny, 21 C"}]
    client.chat.completions.create(model="tiny", messages=messages, tools=[WEATHER])
    second = hermes_tok.decode(engine.prompts[1])
    assert ('<|im_start|>assistant\nChecking.<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n'
            "</tool_call><|im_end|>\n<|im_start|>user\n<tool_response>\nsunny, 21 C\n</tool_response>") in second
    first, recorded = proxy.calls()
    assert recorded.tools == [WEATHER] and recorded.prompt_ids == engine.prompts[1]
    assert recorded.choices[0].token_ids == engine.ids

    unforced = client.chat.completions.create(model="tiny", messages=messages[:1], tools=[WEATHER], tool_choice="none")
    assert unforced.choices[0].message.tool_calls is None and unforced.choices[0].finish_reason == "stop"
    assert "<tools>" not in hermes_tok.decode(engine.prompts[2])
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="tiny", messages=messages[:1], tools=[WEATHER], tool_choice="required")


def test_openai_client_streams_tool_calls(served):
    proxy, _, client = served
    stream = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Paris?"}],
                                            tools=[WEATHER], stream=True)
    content, calls, finish = "", {}, None
    for chunk in stream:
        (choice,) = chunk.choices
        content += choice.delta.content or ""
        for delta in choice.delta.tool_calls or []:  # accumulated by index, as OpenAI clients do
            call = calls.setdefault(delta.index, {"id": None, "name": "", "arguments": ""})
            call["id"] = delta.id or call["id"]
            call["name"] += (delta.function.name or "") if delta.function else ""
            call["arguments"] += (delta.function.arguments or "") if delta.function else ""
        finish = choice.finish_reason or finish
    assert content == "Checking." and finish == "tool_calls"
    assert list(calls) == [0] and calls[0]["name"] == "get_weather" and calls[0]["id"].startswith("call_")
    assert json.loads(calls[0]["arguments"]) == {"city": "Paris"}
    assert len(proxy.calls()) == 1
