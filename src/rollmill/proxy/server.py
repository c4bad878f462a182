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

import uvicorn
from fastapi import FastAPI, Header, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from jinja2 import TemplateError
from starlette.exceptions import HTTPException

from rollmill.agent.tools import for_template, parse_tool_calls, renders_tools
from rollmill.proxy.api import BodySizeLimit, ChatMessage, ChatRequest, OpenAIError, http_error, logprob_entry
from rollmill.proxy.records import ProxyCall
from rollmill.proxy.stream import finish_reason, sse_events
from rollmill.rollout.engine import Completion, Engine, SamplingParams


def _plain_message(message: ChatMessage) -> dict:
    """The message as the chat template expects it: content as one string."""
    plain = message.model_dump(exclude_none=True)
    content = message.content
    if isinstance(content, list):
        content = "".join(part.text for part in content)
    plain["content"] = content or ""
    return plain


def _message(content: str, tool_calls: list[dict]) -> dict:
    """A reply as an OpenAI assistant message: with calls, its other text (or null) and the calls."""
    if not tool_calls:
        return {"role": "assistant", "content": content}
    return {"role": "assistant", "content": content or None, "tool_calls": tool_calls}


def _visible_text(text: str, stop: tuple[str, ...]) -> str:
    """The reply without the stop string that ended it, as OpenAI returns it (the record keeps it)."""
    cuts = [text.find(s) for s in stop if s and s in text]
    return text[: min(cuts)] if cuts else text


def _model_context_length(engine: Engine) -> int | None:
    """The model's own context length where the engine shows it: vLLM's `max_model_len`, else the
    transformers config's `max_position_embeddings`; None when it shows neither."""
    vllm_config = getattr(getattr(getattr(engine, "llm", None), "llm_engine", None), "model_config", None)
    hf_config = getattr(getattr(engine, "model", None), "config", None)
    for value in (getattr(vllm_config, "max_model_len", None), getattr(hf_config, "max_position_embeddings", None)):
        if isinstance(value, int) and value > 0:
            return value
    return None


class ModelProxy:
    """Serves `engine` as an OpenAI-compatible chat model and records every call for training.

    `app` is the FastAPI application: `POST /v1/chat/completions`, `GET /v1/models`,
    `GET /v1/models/{model}`, `GET /health`. A call's session is the `X-Rollmill-Session` header,
    else the request's `user` field, else "default"; a trainer collects a finished episode with
    `pop_calls(session)`. Engine calls are serialized, since engines are not thread-safe. Every
    refusal is an OpenAI-shaped error (`{"error": {message, type, param, code}}`). `stream=True`
    generates the whole reply, records it, then sends it as `chat.completion.chunk` server-sent
    events, one per token (the engine interface hands back only finished completions; see `stream`).
    `tools` are rendered by the chat template and Hermes-style `<tool_call>` blocks in the reply come
    back as OpenAI `tool_calls` (see `rollmill.agent.tools`); the record keeps the raw sampled tokens.

    - `model_name`: the one model served; a request naming another gets 404 `model_not_found`
      (a request without `model` gets this one). The default is what the bundled harness asks for.
    - `default_max_tokens`: the reply budget of a request without `max_tokens`/`max_completion_tokens`
      (shortened to what the context has room for).
    - `max_tokens_limit`: the most reply tokens a request may ask for; more is a 400.
    - `context_length`: prompt + requested reply tokens must fit, else a 400; None uses the model's
      own length as the engine shows it (vLLM `max_model_len`, transformers `max_position_embeddings`),
      a number caps it further. With neither, only `max_tokens_limit` bounds a request.
    - `max_n`: the most choices (`n`) one request may ask for; more is a 400.
    - `max_body_bytes`: larger request bodies get 413, by Content-Length or while they are read.
    - `accept_any_model`: answer whatever `model` a request names (a harness with its own model name).
    """

    def __init__(self, engine: Engine, tokenizer, model_name: str = "policy", default_max_tokens: int = 256, *,
                 max_tokens_limit: int = 4096, context_length: int | None = None, max_n: int = 16,
                 max_body_bytes: int = 8 * 2**20, accept_any_model: bool = False):
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("ModelProxy needs a tokenizer with a chat template")
        positive = {"default_max_tokens": default_max_tokens, "max_tokens_limit": max_tokens_limit, "max_n": max_n,
                    "max_body_bytes": max_body_bytes, "context_length": 1 if context_length is None else context_length}
        for name, value in positive.items():
            if value < 1:
                raise ValueError(f"ModelProxy: {name} must be at least 1, got {value}")
        if default_max_tokens > max_tokens_limit:
            raise ValueError(f"ModelProxy: default_max_tokens ({default_max_tokens}) is above "
                             f"max_tokens_limit ({max_tokens_limit})")
        self.engine = engine
        self.tokenizer = tokenizer
        self.native_tools = renders_tools(tokenizer)  # else tools go into the system message
        self.model_name = model_name
        self.default_max_tokens = default_max_tokens
        self.max_tokens_limit = max_tokens_limit
        known = [n for n in (context_length, _model_context_length(engine)) if n is not None]
        self.context_length = min(known) if known else None
        self.max_n = max_n
        self.max_body_bytes = max_body_bytes
        self.accept_any_model = accept_any_model
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

    def _record(self, session: str, messages: list[dict], prompt_ids: list[int], choices: list[Completion],
                tools: list[dict] | None) -> None:
        with self._records_lock:
            self._calls.append(ProxyCall(self._next_index, session, messages, prompt_ids, choices, tools))
            self._next_index += 1

    def _prompt_ids(self, messages: list[dict], tools: list[dict] | None) -> list[int]:
        templated = for_template(messages, tools, self.native_tools)
        ids = self.tokenizer.apply_chat_template(templated, tools=tools if self.native_tools else None,
                                                 add_generation_prompt=True, tokenize=True)
        if isinstance(ids, Mapping):  # transformers 5 returns a BatchEncoding
            ids = ids["input_ids"]
        return [int(i) for i in ids]

    def _build_app(self) -> FastAPI:
        app = FastAPI(title="rollmill model proxy")
        app.add_middleware(BodySizeLimit, max_bytes=self.max_body_bytes)

        @app.exception_handler(OpenAIError)
        async def refused(request: Request, exc: OpenAIError) -> JSONResponse:
            return exc.response()

        @app.exception_handler(HTTPException)
        async def http_refused(request: Request, exc: HTTPException) -> JSONResponse:
            return http_error(exc, f"{request.method} {request.url.path}").response()

        @app.exception_handler(RequestValidationError)
        async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
            errors = exc.errors()
            if any(e["type"] == "json_invalid" for e in errors):
                return OpenAIError(400, "the request body is not valid JSON").response()
            fields = [".".join(str(p) for p in e["loc"][1:]) for e in errors]
            message = "; ".join(f"{f or 'body'}: {e['msg']}" for f, e in zip(fields, errors))
            return OpenAIError(400, message, fields[0] or None).response()

        @app.exception_handler(Exception)
        async def failed(request: Request, exc: Exception) -> JSONResponse:
            # still OpenAI's shape, so a client reports it; uvicorn logs the traceback
            return OpenAIError(500, f"the model proxy failed: {type(exc).__name__}: {exc}").response()

        @app.get("/health")
        def health() -> dict:
            return {"status": "ok", "policy_version": self.engine.version}

        @app.get("/v1/models")
        def models() -> dict:
            return {"object": "list", "data": [self._model_card()]}

        @app.get("/v1/models/{model}")
        def model(model: str) -> dict:
            self._check_model(model)
            return self._model_card()

        # a plain `def`: FastAPI runs it in a worker thread, so generating never blocks the event loop
        @app.post("/v1/chat/completions")
        def chat_completions(body: ChatRequest, x_rollmill_session: str | None = Header(None)):
            return self._complete(body, x_rollmill_session or body.user or "default")

        return app

    def _model_card(self) -> dict:
        return {"id": self.model_name, "object": "model", "created": 0, "owned_by": "rollmill"}

    def _check_model(self, name: str | None) -> None:
        if name is not None and name != self.model_name and not self.accept_any_model:
            raise OpenAIError(404, f"The model `{name}` does not exist: this proxy serves `{self.model_name}`",
                              "model", "model_not_found")

    def _max_new_tokens(self, body: ChatRequest, prompt_tokens: int) -> int:
        """The reply budget: what the request asks for, within `max_tokens_limit` and the context."""
        param = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
        asked = body.max_completion_tokens or body.max_tokens
        if asked is not None and asked > self.max_tokens_limit:
            raise OpenAIError(400, f"{param} is too large: {asked}. This proxy allows at most {self.max_tokens_limit} "
                                   "completion tokens (max_tokens_limit).", param, "integer_above_max_value")
        if self.context_length is None:
            return asked or self.default_max_tokens
        room = self.context_length - prompt_tokens
        if room < 1 or (asked is not None and asked > room):
            reply = asked or 1
            raise OpenAIError(400, f"This model's maximum context length is {self.context_length} tokens. However, "
                                   f"you requested {prompt_tokens + reply} tokens ({prompt_tokens} in the messages, "
                                   f"{reply} in the completion). Please reduce the length of the messages or "
                                   "completion.", "messages", "context_length_exceeded")
        return asked or min(self.default_max_tokens, room)

    def _complete(self, body: ChatRequest, session: str):
        self._check_model(body.model)
        if body.n is not None and body.n > self.max_n:
            raise OpenAIError(400, f"n is too large: {body.n}. This proxy allows at most {self.max_n} choices per "
                                   "request (max_n).", "n", "integer_above_max_value")
        messages = [_plain_message(m) for m in body.messages]
        # "none" keeps the tools from the model: without constrained decoding that is how a call is prevented
        tools = None
        if body.tools and body.tool_choice != "none":
            tools = [t.model_dump(exclude_none=True) for t in body.tools]
        try:
            prompt_ids = self._prompt_ids(messages, tools)
        except (TemplateError, ValueError) as exc:
            raise OpenAIError(400, f"the chat template could not render these messages: {exc}", "messages") from exc
        stop = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
        sampling = SamplingParams(
            temperature=1.0 if body.temperature is None else body.temperature,
            top_p=1.0 if body.top_p is None else body.top_p,
            max_new_tokens=self._max_new_tokens(body, len(prompt_ids)),
            stop=stop,
            n=body.n or 1,
        )
        with self._engine_lock:
            try:
                choices = self.engine.generate([prompt_ids], sampling, seed=body.seed)
            except ValueError as exc:
                raise OpenAIError(400, f"the engine refused the request: {exc}") from exc
            # recorded under the engine lock, so call indices follow generation order; a streamed
            # reply is recorded here too, before its first chunk is sent
            self._record(session, messages, prompt_ids, choices, tools)
        contents = [_visible_text(c.text, stop) for c in choices]
        calls = [[] for _ in choices]
        if tools:
            call_id = f"call_{uuid.uuid4().hex[:16]}_"
            parsed = [parse_tool_calls(text, id_prefix=f"{call_id}{j}_") for j, text in enumerate(contents)]
            contents, calls = [text or "" for text, _ in parsed], [found for _, found in parsed]
        return self._reply(body, prompt_ids, choices, contents, calls)

    def _reply(self, body: ChatRequest, prompt_ids: list[int], choices: list[Completion], contents: list[str],
               tool_calls: list[list[dict]]):
        """The finished reply: one `chat.completion` object, or its chunks as server-sent events.
        `contents[j]` is choice j's text outside its tool calls, `tool_calls[j]` its calls."""
        completion_tokens = sum(len(c.token_ids) for c in choices)
        usage = {"prompt_tokens": len(prompt_ids), "completion_tokens": completion_tokens,
                 "total_tokens": len(prompt_ids) + completion_tokens}
        head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()),
                "model": body.model or self.model_name}
        if body.stream:
            with_usage = body.stream_options is not None and body.stream_options.include_usage
            events = sse_events(self.tokenizer, head, choices, contents, tool_calls, bool(body.logprobs),
                                usage if with_usage else None)
            return StreamingResponse(iter(events), media_type="text/event-stream")
        return {
            **head,
            "object": "chat.completion",
            "choices": [
                {
                    "index": j,
                    "message": _message(content, calls),
                    "finish_reason": finish_reason(c, calls),
                    "logprobs": self._logprobs(c) if body.logprobs else None,
                }
                for j, (c, content, calls) in enumerate(zip(choices, contents, tool_calls))
            ],
            "usage": usage,
        }

    def _logprobs(self, completion: Completion) -> dict:
        pairs = zip(completion.token_ids, completion.logprobs)
        return {"content": [logprob_entry(self.tokenizer, token_id, logprob) for token_id, logprob in pairs]}

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
