"""An external agent harness inside a network-less sandbox reaches the policy only through the
model proxy's Unix socket bound into the sandbox, and its calls come back as trainable tokens."""

from __future__ import annotations

import json
import shutil

import pytest

from rollmill.models import build_char_tokenizer, build_tiny_model
from rollmill.proxy import ModelProxy, calls_to_trajectory
from rollmill.rollout import HFEngine
from rollmill.sandbox import Mount, SandboxSpec, make_backend

pytestmark = pytest.mark.skipif(shutil.which("bwrap") is None, reason="bubblewrap is not installed")

# A harness written against nothing but the standard library: HTTP over the bound socket.
HARNESS = r'''
import http.client, json, socket, sys

class UnixConnection(http.client.HTTPConnection):
    def connect(self):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect("/run/rollmill/model.sock")

messages = [{"role": "user", "content": "list the files"}]
for turn in range(2):
    conn = UnixConnection("localhost")
    body = {"model": "policy", "messages": messages, "max_tokens": 6, "temperature": 1.0, "seed": turn}
    conn.request("POST", "/v1/chat/completions", json.dumps(body),
                 {"Content-Type": "application/json", "X-Rollmill-Session": "episode-1"})
    reply = json.loads(conn.getresponse().read())["choices"][0]["message"]["content"]
    messages += [{"role": "assistant", "content": reply}, {"role": "user", "content": "go on"}]
print(json.dumps(messages))
'''


def test_harness_in_a_sandbox_uses_the_proxy_over_a_unix_socket(tmp_path):
    tok = build_char_tokenizer()
    proxy = ModelProxy(HFEngine(build_tiny_model(len(tok), seed=1).eval(), tok), tok)
    socket_path = proxy.serve_unix(tmp_path / "model.sock")
    backend = make_backend("bwrap", root=tmp_path / "sb")
    try:
        sid = backend.create(SandboxSpec(mounts=[Mount(source=socket_path, target="/run/rollmill/model.sock")]))
        backend.put(sid, "harness.py", HARNESS.encode())
        result = backend.exec(sid, ["python3", "harness.py"], timeout_s=60)
        assert result.ok, result.stderr
        messages = json.loads(result.stdout)
        interfaces = backend.exec(sid, script="tail -n +3 /proc/net/dev | cut -d: -f1 | tr -d ' '").stdout.split()
    finally:
        backend.close()
        proxy.stop()
    assert interfaces == ["lo"]  # the sandbox still has no network
    calls = proxy.calls("episode-1")
    assert len(calls) == 2
    replies = [m["content"] for m in messages if m["role"] == "assistant"]
    for call, reply in zip(calls, replies):
        sampled = call.choices[0]
        assert tok.decode(sampled.token_ids, skip_special_tokens=True).startswith(reply)
        assert len(sampled.logprobs) == len(sampled.token_ids) > 0
    rows = calls_to_trajectory(calls, reward=0.0).rows
    assert [row.token_ids for row in rows] == [call.choices[0].token_ids for call in calls]
    assert rows[1].prompt_ids[: len(rows[0].prompt_ids)] == rows[0].prompt_ids
