"""The model proxy's limits and streaming: every refusal is an OpenAI-shaped error with the right
status, and `stream=True` sends OpenAI chunks that add up to the non-streamed reply."""

from __future__ import annotations

import json

import httpx
import openai
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from rollmill.proxy import ModelProxy
from rollmill.proxy.stream import token_pieces

# tok and hf_engine are test_proxy's fixtures: imported here, pytest passes them to the tests by name, which
# pyflakes reads as shadowing the imports
# ruff: noqa: F811
from test_proxy import RecordingEngine, StopStringEngine, hf_engine, template_ids, tok, user_turn  # noqa: F401

SEED = 7
ERROR_KEYS = {"message", "type", "param", "code"}


@pytest.fixture
def serve(tok, hf_engine):
    """Start a proxy over a recording engine with these settings: (proxy, engine, chat url)."""
    started = []

    def start(**settings):
        engine = RecordingEngine(hf_engine)
        proxy = ModelProxy(engine, tok, model_name="tiny", **settings)
        started.append(proxy)
        return proxy, engine, proxy.serve() + "/v1/chat/completions"

    yield start
    for proxy in started:
        proxy.stop()


def openai_error(response: httpx.Response, status: int, param: str | None, code: str | None) -> str:
    """Check the status and OpenAI's error shape; return the message."""
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == ERROR_KEYS and error["message"]
    assert (error["type"], error["param"], error["code"]) == (
        "server_error" if status >= 500 else "invalid_request_error", param, code)
    return error["message"]


def sse_payloads(response: httpx.Response) -> list:
    """The `data:` payloads of a server-sent event stream, checking each event is `data: ...` + blank line."""
    assert response.headers["content-type"].startswith("text/event-stream")
    events = response.text.split("\n\n")
    assert events[-1] == ""  # the stream ends with a complete event
    assert all(e.startswith("data: ") and "\n" not in e for e in events[:-1])
    return [e[len("data: "):] for e in events[:-1]]


def test_stream_sends_openai_chunks_that_join_to_the_greedy_reply_and_is_recorded(serve):
    proxy, engine, url = serve()
    body = {"model": "tiny", "messages": [user_turn("Say something.")], "temperature": 0.0, "max_tokens": 12,
            "logprobs": True}
    plain = httpx.post(url, json=body).json()["choices"][0]
    assert plain["message"]["content"]  # something to compare
    payloads = sse_payloads(httpx.post(url, json={**body, "stream": True}))

    assert payloads[-1] == "[DONE]"
    chunks = [json.loads(p) for p in payloads[:-1]]
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"} and len({c["id"] for c in chunks}) == 1
    assert all(c["model"] == "tiny" and len(c["choices"]) == 1 for c in chunks)
    choices = [c["choices"][0] for c in chunks]
    assert choices[0]["delta"] == {"role": "assistant"} and choices[0]["finish_reason"] is None
    assert choices[-1]["delta"] == {} and choices[-1]["finish_reason"] == plain["finish_reason"]
    middle = choices[1:-1]
    assert all(set(c["delta"]) == {"content"} and c["finish_reason"] is None for c in middle)
    assert "".join(c["delta"]["content"] for c in middle) == plain["message"]["content"]
    streamed_logprobs = [e for c in middle for e in c["logprobs"]["content"]]
    assert streamed_logprobs == plain["logprobs"]["content"]

    # the streamed call is recorded like the other: same prompt, same sampled tokens
    first, streamed = proxy.calls()
    assert streamed.prompt_ids == first.prompt_ids
    assert streamed.choices[0].token_ids == first.choices[0].token_ids == engine.returned[1][0].token_ids
    assert len(middle) == len(streamed.choices[0].token_ids)  # one chunk per sampled token


def test_openai_client_streams_n_choices_with_usage(serve):
    proxy, _, url = serve()
    client = openai.OpenAI(base_url=url.removesuffix("/chat/completions"), api_key="x")
    stream = client.chat.completions.create(model="tiny", messages=[user_turn("hi")], n=2, seed=SEED, max_tokens=6,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    (call,) = proxy.calls()
    texts, finish = ["", ""], [None, None]
    for chunk in chunks[:-1]:
        (choice,) = chunk.choices
        texts[choice.index] += choice.delta.content or ""
        finish[choice.index] = choice.finish_reason or finish[choice.index]
        assert chunk.usage is None
    assert texts == [c.text for c in call.choices] and finish == [c.finish_reason for c in call.choices]
    assert chunks[-1].choices == []
    assert chunks[-1].usage.completion_tokens == sum(len(c.token_ids) for c in call.choices)
    assert chunks[-1].usage.prompt_tokens == len(call.prompt_ids)


def test_streamed_content_ends_before_the_stop_string(tok):
    proxy = ModelProxy(StopStringEngine(tok), tok)
    url = proxy.serve()
    try:
        body = {"messages": [user_turn("hi")], "stop": "</a>", "stream": True}
        payloads = sse_payloads(httpx.post(url + "/v1/chat/completions", json=body))
    finally:
        proxy.stop()
    deltas = [json.loads(p)["choices"][0]["delta"] for p in payloads[:-1]]
    assert "".join(d.get("content", "") for d in deltas) == "ab"
    assert proxy.calls()[0].choices[0].text == "ab</a>"


def test_token_pieces_hold_back_a_split_character_and_join_to_the_text():
    core = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))},
                                merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    byte_tok = PreTrainedTokenizerFast(tokenizer_object=core)
    text = "héllo wörld ✓"
    ids = byte_tok(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(text.encode())  # one token per byte: é, ö and ✓ span several
    pieces = token_pieces(byte_tok, ids, text)
    assert len(pieces) == len(ids) and "".join(pieces) == text
    assert pieces[:4] == ["h", "", "é", "l"] and "\ufffd" not in "".join(pieces)
    assert "".join(token_pieces(byte_tok, ids, "héllo")) == "héllo"  # cut at a stop string


@pytest.mark.parametrize("field", ["max_tokens", "max_completion_tokens"])
def test_max_tokens_above_the_limit_is_a_400_naming_it(serve, field):
    proxy, engine, url = serve(max_tokens_limit=50, default_max_tokens=50)
    response = httpx.post(url, json={"messages": [user_turn("hi")], field: 51})
    message = openai_error(response, 400, field, "integer_above_max_value")
    assert "50" in message and "max_tokens_limit" in message
    assert httpx.post(url, json={"messages": [user_turn("hi")], field: 50}).status_code == 200
    assert len(engine.returned) == 1


def test_prompt_and_reply_must_fit_the_context(serve, tok):
    proxy, engine, url = serve(context_length=60)
    prompt_tokens = len(template_ids(tok, [user_turn("x" * 30)]))
    assert prompt_tokens < 60

    too_long = httpx.post(url, json={"messages": [user_turn("x" * 80)]})
    assert "maximum context length is 60 tokens" in openai_error(too_long, 400, "messages", "context_length_exceeded")
    room = 60 - prompt_tokens
    over = httpx.post(url, json={"messages": [user_turn("x" * 30)], "max_tokens": room + 1})
    message = openai_error(over, 400, "messages", "context_length_exceeded")
    assert f"{prompt_tokens} in the messages, {room + 1} in the completion" in message
    assert engine.returned == [] and proxy.calls() == []

    # without max_tokens the default budget shrinks to the room the context has left
    assert httpx.post(url, json={"messages": [user_turn("x" * 30)]}).status_code == 200
    assert engine.requests[0][1].max_new_tokens == room


def test_context_length_comes_from_the_engine_and_a_setting_only_lowers_it(tok, hf_engine):
    assert ModelProxy(hf_engine, tok).context_length == 1024  # the tiny Llama's max_position_embeddings
    assert ModelProxy(hf_engine, tok, context_length=100).context_length == 100
    assert ModelProxy(hf_engine, tok, context_length=5000).context_length == 1024
    assert ModelProxy(RecordingEngine(hf_engine), tok).context_length is None  # an engine that does not say
    proxy = ModelProxy(hf_engine, tok)
    url = proxy.serve()
    try:
        response = httpx.post(url + "/v1/chat/completions", json={"messages": [user_turn("hi")], "max_tokens": 1020})
    finally:
        proxy.stop()
    assert "1024" in openai_error(response, 400, "messages", "context_length_exceeded")


def test_a_wrong_model_is_404_unless_any_name_is_accepted(serve):
    proxy, engine, url = serve()
    base = url.removesuffix("/chat/completions")
    wrong = httpx.post(url, json={"model": "gpt-4o", "messages": [user_turn("hi")]})
    assert "gpt-4o" in openai_error(wrong, 404, "model", "model_not_found")
    with pytest.raises(openai.NotFoundError):
        openai.OpenAI(base_url=base, api_key="x").chat.completions.create(model="gpt-4o", messages=[user_turn("hi")])
    assert engine.returned == []
    assert [m["id"] for m in httpx.get(base + "/models").json()["data"]] == ["tiny"]
    assert httpx.get(base + "/models/tiny").json()["id"] == "tiny"
    openai_error(httpx.get(base + "/models/gpt-4o"), 404, "model", "model_not_found")

    _, _, any_url = serve(accept_any_model=True)
    reply = httpx.post(any_url, json={"model": "gpt-4o", "messages": [user_turn("hi")], "max_tokens": 2})
    assert reply.status_code == 200 and reply.json()["model"] == "gpt-4o"


def test_the_default_name_is_the_one_the_bundled_harness_asks_for(tok, hf_engine):
    assert ModelProxy(hf_engine, tok).model_name == "policy"  # mini_agent.py sends "model": "policy"


def test_an_oversized_body_is_413_by_content_length_or_while_read(serve):
    proxy, engine, url = serve(max_body_bytes=2000)
    body = json.dumps({"messages": [user_turn("x" * 3000)]}).encode()
    declared = httpx.post(url, content=body, headers={"content-type": "application/json"})
    assert "2000 bytes" in openai_error(declared, 413, None, "request_too_large")

    def chunked():  # no Content-Length: counted as it arrives
        yield from (body[i:i + 500] for i in range(0, len(body), 500))

    streamed = httpx.post(url, content=chunked(), headers={"content-type": "application/json"})
    assert streamed.request.headers["transfer-encoding"] == "chunked"
    assert "2000 bytes" in openai_error(streamed, 413, None, "request_too_large")
    assert engine.returned == []
    assert httpx.post(url, json={"messages": [user_turn("x" * 100)], "max_tokens": 2}).status_code == 200


def test_n_above_the_limit_is_a_400(serve):
    proxy, engine, url = serve(max_n=4)
    message = openai_error(httpx.post(url, json={"messages": [user_turn("hi")], "n": 5}), 400, "n",
                           "integer_above_max_value")
    assert "4" in message and "max_n" in message
    assert engine.returned == []
    reply = httpx.post(url, json={"messages": [user_turn("hi")], "n": 4, "max_tokens": 2}).json()
    assert len(reply["choices"]) == 4


def test_every_error_has_openai_shape(serve, tok):
    proxy, _, url = serve()
    base = url.removesuffix("/v1/chat/completions")
    assert "POST /v1/nope" in openai_error(httpx.post(base + "/v1/nope", json={}), 404, None, None)
    wrong_method = httpx.get(url)
    assert "GET /v1/chat/completions" in openai_error(wrong_method, 405, None, None)
    assert wrong_method.headers["allow"] == "POST"
    openai_error(httpx.post(url, json={"messages": [user_turn("hi")], "n": 0}), 400, "n", None)
    openai_error(httpx.post(url, content=b"{oops", headers={"content-type": "application/json"}), 400, None, None)

    class BrokenEngine:
        version = 0

        def generate(self, prompts, sampling, seed=None):
            raise RuntimeError("the GPU fell over")

    broken = ModelProxy(BrokenEngine(), tok)
    broken_url = broken.serve()
    try:
        response = httpx.post(broken_url + "/v1/chat/completions", json={"messages": [user_turn("hi")]})
    finally:
        broken.stop()
    assert "the GPU fell over" in openai_error(response, 500, None, None)


@pytest.mark.parametrize("settings, name", [
    ({"max_n": 0}, "max_n"),
    ({"max_tokens_limit": 0}, "max_tokens_limit"),
    ({"max_body_bytes": 0}, "max_body_bytes"),
    ({"context_length": 0}, "context_length"),
    ({"default_max_tokens": 300, "max_tokens_limit": 200}, "default_max_tokens"),
])
def test_settings_that_cannot_work_are_refused(tok, hf_engine, settings, name):
    with pytest.raises(ValueError, match=name):
        ModelProxy(hf_engine, tok, **settings)
