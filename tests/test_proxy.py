import copy
import threading
import time

import httpx
import openai
import pytest

from rollmill.models import build_char_tokenizer, build_tiny_model
from rollmill.proxy import ModelProxy, calls_to_trajectory
from rollmill.rollout import Completion, HFEngine, SamplingParams

SEED = 7


class RecordingEngine:
    """Wraps an engine and keeps a deep copy of every request and of the Completions it returned."""

    def __init__(self, inner):
        self.inner = inner
        self.requests: list[tuple[list[list[int]], SamplingParams, int | None]] = []
        self.returned: list[list[Completion]] = []

    @property
    def version(self):
        return self.inner.version

    def generate(self, prompts, sampling, seed=None):
        out = self.inner.generate(prompts, sampling, seed=seed)
        self.requests.append((copy.deepcopy(prompts), sampling, seed))
        self.returned.append(copy.deepcopy(out))
        return out


@pytest.fixture(scope="module")
def tok():
    return build_char_tokenizer()


@pytest.fixture(scope="module")
def hf_engine(tok):
    return HFEngine(build_tiny_model(len(tok), seed=1).eval(), tok)


@pytest.fixture
def served(tok, hf_engine):
    """A proxy on a free loopback port over a recording engine: (proxy, engine, base url)."""
    engine = RecordingEngine(hf_engine)
    proxy = ModelProxy(engine, tok, model_name="tiny")
    url = proxy.serve()
    yield proxy, engine, url
    proxy.stop()


def template_ids(tok, messages):
    out = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def user_turn(content):
    return {"role": "user", "content": content}


def test_openai_client_conversation_records_exactly_what_the_engine_sampled(served, tok, hf_engine):
    proxy, engine, url = served
    client = openai.OpenAI(base_url=url + "/v1", api_key="x")
    messages = [{"role": "system", "content": "Be brief."}, user_turn("What is 2 + 3?")]
    sent, replies = [], []
    for k in range(3):
        sent.append(copy.deepcopy(messages))
        reply = client.chat.completions.create(
            model="tiny", messages=messages, temperature=1.0, seed=SEED, max_tokens=10, logprobs=True,
            extra_headers={"X-Rollmill-Session": "episode-1"},
        )
        replies.append(reply)
        messages += [{"role": "assistant", "content": reply.choices[0].message.content}, user_turn(f"And then {k}?")]

    calls = proxy.calls("episode-1")
    assert [c.index for c in calls] == [0, 1, 2]
    assert len(engine.returned) == 3
    for k, (call, reply) in enumerate(zip(calls, replies)):
        (sampled,) = engine.returned[k]
        prompts, sampling, seed = engine.requests[k]
        assert (sampling.temperature, sampling.max_new_tokens, sampling.n, seed) == (1.0, 10, 1, SEED)
        assert call.messages == sent[k]
        assert call.prompt_ids == template_ids(tok, sent[k]) == prompts[0]
        (choice,) = call.choices
        assert choice.token_ids == sampled.token_ids and len(choice.token_ids) > 0
        assert choice.logprobs == sampled.logprobs
        assert (choice.finish_reason, choice.policy_version) == (sampled.finish_reason, 0)
        content = reply.choices[0].message.content
        assert content == choice.text == tok.decode(sampled.token_ids, skip_special_tokens=True)
        assert [t.logprob for t in reply.choices[0].logprobs.content] == sampled.logprobs
        assert reply.choices[0].finish_reason == sampled.finish_reason
        assert reply.usage.prompt_tokens == len(call.prompt_ids)
        assert reply.usage.completion_tokens == len(sampled.token_ids)
    # each later prompt holds the earlier reply as text
    assert replies[0].choices[0].message.content in tok.decode(calls[1].prompt_ids)

    # the proxy adds nothing to sampling: the engine alone gives the same tokens for the same seed
    (direct,) = hf_engine.generate([calls[0].prompt_ids], SamplingParams(temperature=1.0, max_new_tokens=10), SEED)
    assert direct.token_ids == calls[0].choices[0].token_ids

    assert [(c.index, c.session) for c in calls] == [(0, "episode-1"), (1, "episode-1"), (2, "episode-1")]
    traj = calls_to_trajectory(calls, reward=1.0)
    assert [row.token_ids for row in traj.rows] == [r[0].token_ids for r in engine.returned]
    assert [row.prompt_ids for row in traj.rows] == [c.prompt_ids for c in calls]
    assert [row.logprobs for row in traj.rows] == [r[0].logprobs for r in engine.returned]
    assert [row.turn_of_token[0] for row in traj.rows] == [0, 1, 2]  # one chunk per call
    assert traj.versions == [0] * traj.sampled_tokens and [t.reward for t in traj.turns] == [0.0, 0.0, 1.0]


def test_n_choices_are_recorded_and_returned_in_order(served):
    proxy, engine, url = served
    body = {"messages": [user_turn("hi")], "n": 3, "max_completion_tokens": 4, "seed": SEED, "temperature": 1.0}
    reply = httpx.post(url + "/v1/chat/completions", json=body).json()
    (call,) = proxy.calls()
    assert [c["index"] for c in reply["choices"]] == [0, 1, 2]
    assert [c.token_ids for c in call.choices] == [c.token_ids for c in engine.returned[0]]
    assert all(len(c.token_ids) <= 4 for c in call.choices)
    assert reply["usage"]["completion_tokens"] == sum(len(c.token_ids) for c in call.choices)
    assert calls_to_trajectory([call], 0.0).rows[0].token_ids == call.choices[0].token_ids  # the first choice trains


def test_unix_socket_serves_the_openai_client_and_stop_removes_it(tmp_path, tok, hf_engine):
    path = tmp_path / "proxy.sock"
    proxy = ModelProxy(RecordingEngine(hf_engine), tok, model_name="tiny")
    assert proxy.serve_unix(path) == str(path)
    try:
        with httpx.Client(transport=httpx.HTTPTransport(uds=str(path)), base_url="http://proxy") as http:
            assert http.get("/health").json() == {"status": "ok", "policy_version": 0}
            assert [m["id"] for m in http.get("/v1/models").json()["data"]] == ["tiny"]
            client = openai.OpenAI(base_url="http://proxy/v1", api_key="x", http_client=http)
            reply = client.chat.completions.create(model="tiny", messages=[user_turn("hi")], seed=SEED, max_tokens=5)
        (call,) = proxy.calls()
        assert reply.choices[0].message.content == call.choices[0].text
        assert reply.usage.completion_tokens == len(call.choices[0].token_ids)
    finally:
        proxy.stop()
    assert not path.exists()


@pytest.mark.parametrize("body, field", [
    ({"model": "tiny"}, "messages"),
    ({"messages": "hi"}, "messages"),
    ({"messages": []}, "messages"),
    ({"messages": [{"content": "hi"}]}, "messages.0.role"),
    ({"messages": [{"role": "user", "content": 3}]}, "messages.0.content"),
    ({"messages": [user_turn("hi")], "n": 0}, "n"),
    ({"messages": [user_turn("hi")], "max_tokens": -1}, "max_tokens"),
    ({"messages": [user_turn("hi")], "temperature": "hot"}, "temperature"),
    ({"messages": [user_turn("hi")], "stop": 5}, "stop"),
    ([user_turn("hi")], None),
])
def test_bad_requests_get_400_with_a_reason_and_the_server_keeps_serving(served, body, field):
    proxy, engine, url = served
    response = httpx.post(url + "/v1/chat/completions", json=body)
    assert response.status_code == 400
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"
    assert error["message"]
    assert error["param"] == field or error["param"].startswith(field + ".")  # a union adds its branch
    assert proxy.calls() == [] and engine.returned == []

    not_json = httpx.post(url + "/v1/chat/completions", content=b"{oops", headers={"content-type": "application/json"})
    assert not_json.status_code == 400 and "JSON" in not_json.json()["error"]["message"]

    ok = httpx.post(url + "/v1/chat/completions", json={"messages": [user_turn("hi")], "max_tokens": 3,
                                                        "tools": [], "frequency_penalty": 0.5, "temperature": None})
    assert ok.status_code == 200 and len(proxy.calls()) == 1


def test_content_parts_are_joined_into_one_string(served, tok):
    proxy, _, url = served
    parts = [{"type": "text", "text": "Hello, "}, {"type": "text", "text": "world"}]
    httpx.post(url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": parts}], "max_tokens": 2})
    (call,) = proxy.calls()
    assert call.messages == [user_turn("Hello, world")]
    assert call.prompt_ids == template_ids(tok, [user_turn("Hello, world")])


def test_sessions_are_separated_and_pop_calls_forgets_them(served):
    proxy, _, url = served

    def ask(headers=None, **fields):
        body = {"messages": [user_turn("hi")], "max_tokens": 2, **fields}
        assert httpx.post(url + "/v1/chat/completions", json=body, headers=headers).status_code == 200

    ask({"X-Rollmill-Session": "a"})
    ask({"X-Rollmill-Session": "b"})
    ask({"X-Rollmill-Session": "a"}, user="ignored-when-the-header-is-set")
    ask(user="c")
    ask()
    assert [c.index for c in proxy.calls("a")] == [0, 2]
    assert [c.index for c in proxy.calls("b")] == [1]
    assert [c.index for c in proxy.calls("c")] == [3]
    assert [c.index for c in proxy.calls("default")] == [4]

    assert [c.index for c in proxy.pop_calls("a")] == [0, 2]
    assert proxy.calls("a") == [] and proxy.pop_calls("a") == []
    assert [c.index for c in proxy.calls()] == [1, 3, 4]
    ask({"X-Rollmill-Session": "a"})
    assert [c.index for c in proxy.calls("a")] == [5]  # indices keep counting after a pop
    proxy.clear()
    assert proxy.calls() == []


class StopStringEngine:
    """Always replies "ab</a>", finished by the stop string `</a>` (as an engine reports it)."""

    def __init__(self, tok, version: int = 0):
        self.tok, self.version = tok, version

    def generate(self, prompts, sampling, seed=None):
        ids = self.tok("ab</a>", add_special_tokens=False)["input_ids"]
        return [Completion(0, prompts[0], ids, [-1.0] * len(ids), "ab</a>", "stop", self.version)]


def test_reply_content_ends_before_the_stop_string_but_the_record_keeps_it(tok):
    proxy = ModelProxy(StopStringEngine(tok, version=3), tok)
    url = proxy.serve()
    try:
        reply = httpx.post(url + "/v1/chat/completions", json={"messages": [user_turn("hi")], "stop": "</a>"}).json()
    finally:
        proxy.stop()
    assert reply["choices"][0]["message"]["content"] == "ab"
    (call,) = proxy.calls()
    assert (call.choices[0].text, call.choices[0].policy_version) == ("ab</a>", 3)


def test_concurrent_requests_reach_the_engine_one_at_a_time(tok, hf_engine):
    class SlowEngine(RecordingEngine):
        active = peak = 0

        def generate(self, prompts, sampling, seed=None):
            SlowEngine.active += 1
            SlowEngine.peak = max(SlowEngine.peak, SlowEngine.active)
            time.sleep(0.05)
            try:
                return super().generate(prompts, sampling, seed)
            finally:
                SlowEngine.active -= 1

    proxy = ModelProxy(SlowEngine(hf_engine), tok)
    url = proxy.serve()
    statuses = []

    def ask(i):
        body = {"messages": [user_turn(f"q{i}")], "max_tokens": 2}
        statuses.append(httpx.post(url + "/v1/chat/completions", json=body, timeout=30).status_code)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(4)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        proxy.stop()
    assert statuses == [200] * 4
    assert SlowEngine.peak == 1
    assert sorted(c.index for c in proxy.calls()) == [0, 1, 2, 3]
