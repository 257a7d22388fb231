"""The OpenAI wire format: request models (validated, with 4xx messages naming the field) and response builders."""

from __future__ import annotations

import json
import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from slmforge.lm.types import LMError, Request, Result


# The engine-facing types are slmforge.lm's: one request, one result and one error type for every caller.
APIError = LMError  # an error the client caused (4xx) or a backend failure (5xx), sent as OpenAI's {"error": {...}} body
GenRequest = Request
Generation = Result


# ------------------------------------------------------------------------------------------ requests
class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")  # OpenAI clients send many optional knobs; unknown ones are ignored


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: str
    text: str | None = None


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None

    def text(self) -> str:
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        parts = []
        for p in self.content:
            if p.type != "text" or p.text is None:
                raise APIError(400, f"content part of type {p.type!r} is not supported (text only)", "messages", "unsupported_content")
            parts.append(p.text)
        return "".join(parts)


class JsonSchemaSpec(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)
    name: str = "response"
    schema_: dict = Field(default_factory=dict, alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text", "json_object", "json_schema"] = "text"
    json_schema: JsonSchemaSpec | None = None


class _Sampling(_Request):
    model: str = ""
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: dict | None = None
    retrieval: bool | None = Field(None, description="slmforge: passages of the server's index in the prompt "
                                   "(chat: on by default when the server has an index; completions: off by default)")
    n: int = Field(1, ge=1, le=1, description="one choice per request")
    seed: int | None = None

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, v):
        if isinstance(v, str):
            v = [v]
        if v is not None and (len(v) > 4 or any(not s for s in v)):
            raise ValueError("at most 4 non-empty stop sequences")
        return v


class ChatRequest(_Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    response_format: ResponseFormat | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20, description="accepted; only the chosen token's log-prob is returned")


class CompletionRequest(_Sampling):
    prompt: str | list[str]
    logprobs: int | None = Field(None, ge=0, le=5, description="accepted; only the chosen token's log-prob is returned")
    echo: bool = False

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, v):
        if isinstance(v, list):
            if len(v) != 1 or not isinstance(v[0], str):
                raise ValueError("exactly one prompt string per request")
            v = v[0]
        return v


def parse(model: type[BaseModel], raw: bytes) -> Any:
    """Body bytes -> request model, or a 400 that says which field is wrong."""
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise APIError(400, f"the request body is not valid JSON: {err}") from None
    if not isinstance(data, dict):
        raise APIError(400, "the request body must be a JSON object")
    try:
        return model.model_validate(data)
    except ValidationError as err:
        e = err.errors()[0]
        where = ".".join(str(p) for p in e["loc"]) or "body"
        raise APIError(400, f"{where}: {e['msg']}" + (f" ({err.error_count() - 1} more problems)" if err.error_count() > 1 else ""),
                       where) from None


# ------------------------------------------------------------------------------------------ responses
def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(g: Generation) -> dict:
    return {"prompt_tokens": g.prompt_tokens, "completion_tokens": g.completion_tokens,
            "total_tokens": g.prompt_tokens + g.completion_tokens}


def chat_response(g: Generation, route: dict, want_logprobs: bool) -> dict:
    logprobs = None
    if want_logprobs and g.logprobs is not None:
        logprobs = {"content": [{"token": t, "logprob": lp, "bytes": list(t.encode()), "top_logprobs": []}
                                for t, lp in zip(g.tokens, g.logprobs)]}
    return {"id": new_id("chatcmpl"), "object": "chat.completion", "created": int(time.time()), "model": g.model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": g.text}, "logprobs": logprobs,
                         "finish_reason": g.finish_reason}],
            "usage": usage(g), "slmforge": route}


def completion_response(g: Generation, route: dict, want_logprobs: bool) -> dict:
    logprobs = None
    if want_logprobs and g.logprobs is not None:
        logprobs = {"tokens": g.tokens, "token_logprobs": g.logprobs, "top_logprobs": None, "text_offset": None}
    return {"id": new_id("cmpl"), "object": "text_completion", "created": int(time.time()), "model": g.model,
            "choices": [{"index": 0, "text": g.text, "logprobs": logprobs, "finish_reason": g.finish_reason}],
            "usage": usage(g), "slmforge": route}


def sse(obj: dict | str) -> bytes:
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj)}\n\n".encode()


def chat_chunk(cid: str, model: str, delta: dict, finish: str | None = None, **extra) -> dict:
    return {"id": cid, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}], **extra}


def completion_chunk(cid: str, model: str, text: str, finish: str | None = None, **extra) -> dict:
    return {"id": cid, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}], **extra}
