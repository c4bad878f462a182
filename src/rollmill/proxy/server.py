"""An OpenAI-compatible chat endpoint in front of a rollout engine that records every call.

An agent written against the OpenAI API (or run inside a network-less sandbox, reaching the proxy
through a bound Unix socket) talks to the policy being trained; the proxy keeps the exact prompt
ids, sampled token ids and log-probs of each call, so a trainer can turn an episode into chunks
without re-tokenizing anything the model wrote.
"""

from __future__ import annotations

import os
import threading
import time
import uuid
from collections.abc import Mapping
from typing import Literal

import uvicorn
from fastapi import FastAPI, Header, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from jinja2 import TemplateError
from pydantic import BaseModel, ConfigDict, Field

from rollmill.proxy.records import ProxyCall
from rollmill.rollout.engine import Completion, Engine, SamplingParams


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    # extra keys (name, tool_calls, tool_call_id) reach the chat template, which may render them
    model_config = ConfigDict(extra="allow", strict=True)
    role: str = Field(min_length=1)
    content: str | list[TextPart] | None = None


class ChatRequest(BaseModel):
    """The accepted part of an OpenAI chat request; other fields (tools, penalties...) are ignored.

    Clients may send any optional field as null, which means its default.
    """

    model_config = ConfigDict(extra="ignore", strict=True)
    messages: list[ChatMessage] = Field(min_length=1)
    model: str | None = None
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    stop: str | list[str] | None = None
    n: int | None = Field(None, ge=1)
    seed: int | None = None
    user: str | None = None
    logprobs: bool | None = None


def _error(status: int, message: str, param: str | None = None) -> JSONResponse:
    """An error body in OpenAI's shape, which its clients turn into a readable exception."""
    return JSONResponse(
        status_code=status,
        content={"error": {"message": message, "type": "invalid_request_error", "param": param, "code": None}},
    )


def _plain_message(message: ChatMessage) -> dict:
    """The message as the chat template expects it: content as one string."""
    plain = message.model_dump(exclude_none=True)
    content = message.content
    if isinstance(content, list):
        content = "".join(part.text for part in content)
    plain["content"] = content or ""
    return plain


def _visible_text(text: str, stop: tuple[str, ...]) -> str:
    """The reply without the stop string that ended it, as OpenAI returns it (the record keeps it)."""
    cuts = [text.find(s) for s in stop if s and s in text]
    return text[: min(cuts)] if cuts else text


class ModelProxy:
    """Serves `engine` as an OpenAI-compatible chat model and records every call for training.

    `app` is the FastAPI application: `POST /v1/chat/completions`, `GET /v1/models`,
    `GET /health`. A call's session is the `X-Rollmill-Session` header, else the request's `user`
    field, else "default"; a trainer collects a finished episode with `pop_calls(session)`.
    Engine calls are serialized, since engines are not thread-safe.
    """

    def __init__(self, engine: Engine, tokenizer, model_name: str = "rollmill", default_max_tokens: int = 256):
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("ModelProxy needs a tokenizer with a chat template")
        self.engine = engine
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.default_max_tokens = default_max_tokens
        self._engine_lock = threading.Lock()
        self._records_lock = threading.Lock()
        self._calls: list[ProxyCall] = []
        self._next_index = 0
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self._socket_path: str | None = None
        self.app = self._build_app()

    def calls(self, session: str | None = None) -> list[ProxyCall]:
        """Recorded calls in order, all of them or those of one session."""
        with self._records_lock:
            return [c for c in self._calls if session is None or c.session == session]

    def pop_calls(self, session: str) -> list[ProxyCall]:
        """Return a session's calls and forget them (a trainer collecting a finished episode)."""
        with self._records_lock:
            popped = [c for c in self._calls if c.session == session]
            self._calls = [c for c in self._calls if c.session != session]
        return popped

    def clear(self) -> None:
        """Forget every recorded call."""
        with self._records_lock:
            self._calls = []

    def _record(self, session: str, messages: list[dict], prompt_ids: list[int], choices: list[Completion]) -> None:
        with self._records_lock:
            self._calls.append(ProxyCall(self._next_index, session, messages, prompt_ids, choices))
            self._next_index += 1

    def _prompt_ids(self, messages: list[dict]) -> list[int]:
        ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        if isinstance(ids, Mapping):  # transformers 5 returns a BatchEncoding
            ids = ids["input_ids"]
        return [int(i) for i in ids]

    def _build_app(self) -> FastAPI:
        app = FastAPI(title="rollmill model proxy")

        @app.exception_handler(RequestValidationError)
        async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
            errors = exc.errors()
            if any(e["type"] == "json_invalid" for e in errors):
                return _error(400, "the request body is not valid JSON")
            fields = [".".join(str(p) for p in e["loc"][1:]) for e in errors]
            message = "; ".join(f"{f or 'body'}: {e['msg']}" for f, e in zip(fields, errors))
            return _error(400, message, fields[0] or None)

        @app.get("/health")
        def health() -> dict:
            return {"status": "ok", "policy_version": self.engine.version}

        @app.get("/v1/models")
        def models() -> dict:
            card = {"id": self.model_name, "object": "model", "created": 0, "owned_by": "rollmill"}
            return {"object": "list", "data": [card]}

        # a plain `def`: FastAPI runs it in a worker thread, so generating never blocks the event loop
        @app.post("/v1/chat/completions")
        def chat_completions(body: ChatRequest, x_rollmill_session: str | None = Header(None)):
            return self._complete(body, x_rollmill_session or body.user or "default")

        return app

    def _complete(self, body: ChatRequest, session: str):
        messages = [_plain_message(m) for m in body.messages]
        try:
            prompt_ids = self._prompt_ids(messages)
        except (TemplateError, ValueError) as exc:
            return _error(400, f"the chat template could not render these messages: {exc}", "messages")
        stop = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
        sampling = SamplingParams(
            temperature=1.0 if body.temperature is None else body.temperature,
            top_p=1.0 if body.top_p is None else body.top_p,
            max_new_tokens=body.max_completion_tokens or body.max_tokens or self.default_max_tokens,
            stop=stop,
            n=body.n or 1,
        )
        with self._engine_lock:
            try:
                choices = self.engine.generate([prompt_ids], sampling, seed=body.seed)
            except ValueError as exc:
                return _error(400, f"the engine refused the request: {exc}")
            # recorded under the engine lock, so call indices follow generation order
            self._record(session, messages, prompt_ids, choices)
        completion_tokens = sum(len(c.token_ids) for c in choices)
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": body.model or self.model_name,
            "choices": [
                {
                    "index": j,
                    "message": {"role": "assistant", "content": _visible_text(c.text, stop)},
                    "finish_reason": c.finish_reason,
                    "logprobs": self._logprobs(c) if body.logprobs else None,
                }
                for j, c in enumerate(choices)
            ],
            "usage": {
                "prompt_tokens": len(prompt_ids),
                "completion_tokens": completion_tokens,
                "total_tokens": len(prompt_ids) + completion_tokens,
            },
        }

    def _logprobs(self, completion: Completion) -> dict:
        content = []
        for token_id, logprob in zip(completion.token_ids, completion.logprobs):
            token = self.tokenizer.decode([token_id])
            content.append({"token": token, "logprob": logprob, "bytes": list(token.encode()), "top_logprobs": []})
        return {"content": content}

    def serve(self, host: str = "127.0.0.1", port: int = 0, timeout: float = 30.0) -> str:
        """Serve over TCP in a background thread; return the base URL (port 0 picks a free port)."""
        server = self._start(timeout, host=host, port=port)
        bound_port = server.servers[0].sockets[0].getsockname()[1]
        url_host = f"[{host}]" if ":" in host else host
        return f"http://{url_host}:{bound_port}"

    def serve_unix(self, path: str | os.PathLike, timeout: float = 30.0) -> str:
        """Serve on a Unix domain socket at `path` (bind it into a sandbox); return the path."""
        path = os.fspath(path)
        self._start(timeout, uds=path)
        self._socket_path = path
        return path

    def stop(self, timeout: float = 10.0) -> None:
        """Shut the server down and remove its Unix socket, if any."""
        if self._server is None:
            return
        self._server.should_exit = True
        self._thread.join(timeout)
        if self._socket_path is not None and os.path.exists(self._socket_path):
            os.unlink(self._socket_path)
        self._server = self._thread = self._socket_path = None

    def _start(self, timeout: float, **bind) -> uvicorn.Server:
        if self._server is not None:
            raise RuntimeError("the proxy is already serving; call stop() first")
        server = uvicorn.Server(uvicorn.Config(self.app, log_level="warning", access_log=False, **bind))
        thread = threading.Thread(target=server.run, name="rollmill-proxy", daemon=True)
        thread.start()
        deadline = time.monotonic() + timeout
        while not server.started:
            if not thread.is_alive():
                raise RuntimeError("the proxy server failed to start; uvicorn logged why")
            if time.monotonic() > deadline:
                server.should_exit = True
                raise RuntimeError(f"the proxy server did not start within {timeout}s")
            time.sleep(0.01)
        self._server, self._thread = server, thread
        return server
