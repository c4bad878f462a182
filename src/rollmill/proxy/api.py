"""The OpenAI-facing surface of the model proxy: the accepted request, errors in OpenAI's shape,
and the request-body size limit."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Receive, Scope, Send


class TextPart(BaseModel):
    """One text part of a message's content (other part types are refused)."""

    model_config = ConfigDict(extra="ignore", strict=True)
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    """One chat message; extra keys (name, tool_calls, tool_call_id) reach the chat template, which
    renders them (assistant `tool_calls` arguments as objects; see `rollmill.agent.tools`)."""

    model_config = ConfigDict(extra="allow", strict=True)
    role: str = Field(min_length=1)
    content: str | list[TextPart] | None = None


class StreamOptions(BaseModel):
    """`include_usage` adds a last chunk with the token counts (and `"usage": null` on the others)."""

    model_config = ConfigDict(extra="ignore", strict=True)
    include_usage: bool | None = None


class FunctionSpec(BaseModel):
    """A tool's function: its name, and the description and JSON-schema parameters the model reads."""

    model_config = ConfigDict(extra="allow", strict=True)
    name: str = Field(min_length=1)
    description: str | None = None
    parameters: dict | None = None


class ToolSpec(BaseModel):
    """One OpenAI tool; only function tools exist."""

    model_config = ConfigDict(extra="ignore", strict=True)
    type: Literal["function"]
    function: FunctionSpec


class ChatRequest(BaseModel):
    """The accepted part of an OpenAI chat request; other fields (penalties, parallel_tool_calls...) are ignored.

    `tools` are rendered by the chat template and the reply is parsed for tool calls; `tool_choice`
    "none" sends no tools to the model. Forcing a call ("required", a named function) would need
    constrained decoding, so it is refused.

    Clients may send any optional field as null, which means its default. Limits that depend on the
    proxy's settings (model name, `n`, `max_tokens`, context length) are checked by the proxy.
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
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    tools: list[ToolSpec] | None = None
    tool_choice: Literal["auto", "none"] | None = None


class OpenAIError(Exception):
    """A refused request: the proxy answers `status` with `{"error": {message, type, param, code}}`."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: Mapping[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers

    def response(self) -> JSONResponse:
        """The error as OpenAI sends it, which its clients turn into a readable exception."""
        kind = "server_error" if self.status >= 500 else "invalid_request_error"
        error = {"message": self.message, "type": kind, "param": self.param, "code": self.code}
        return JSONResponse(status_code=self.status, content={"error": error}, headers=self.headers)


def http_error(exc: HTTPException, where: str = "") -> OpenAIError:
    """An HTTP-level refusal (unknown path, wrong method, body too large) in OpenAI's shape; `where`
    names the request (method and path), as OpenAI's "Invalid URL" does."""
    message = f"{exc.detail} ({where})" if where else str(exc.detail)
    return OpenAIError(exc.status_code, message, None, "request_too_large" if exc.status_code == 413 else None,
                       exc.headers)


class BodySizeLimit:
    """ASGI middleware that refuses request bodies over `max_bytes` with 413.

    A declared Content-Length over the limit is refused before anything is read. A body without one
    (chunked) or one that lies about its size is counted while it is read: the first byte over the
    limit raises an HTTPException, which the app's exception handler answers; the rest is never read.
    """

    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes
        self.message = f"the request body is larger than the proxy's limit of {max_bytes} bytes (max_body_bytes)"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return await http_error(HTTPException(413, self.message)).response()(scope, receive, send)
        received = 0

        async def counted() -> dict:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    # FastAPI passes an HTTPException raised while reading the body on to the handlers
                    raise HTTPException(413, self.message)
            return message

        await self.app(scope, counted, send)


def logprob_entry(tokenizer, token_id: int, logprob: float) -> dict:
    """One token of a choice's `logprobs.content`, as OpenAI reports it (no alternatives)."""
    token = tokenizer.decode([token_id])
    return {"token": token, "logprob": logprob, "bytes": list(token.encode()), "top_logprobs": []}
