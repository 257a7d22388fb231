"""The request a model is asked and the result it gives, for every backend and every caller."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field


class LMError(Exception):
    """A request that failed: one the caller got wrong (4xx), a backend that failed (5xx), or a full queue (503).
    `status`/`param`/`code` follow OpenAI's error body; `retry_after` (seconds) is set when trying later may work."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 retry_after: float | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.retry_after = status, message, param, code, retry_after

    def body(self) -> dict:
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        if self.status == 401:
            kind = "authentication_error"
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


@dataclass
class Request:
    """One generation. Exactly one of `messages` (chat), `prompt` (plain text) or `prompt_ids` (token ids) is set."""

    messages: list[dict] | None = None
    prompt: str | None = None
    prompt_ids: list[int] | None = None  # token ids as they are (export feeds two readers of one model the same ids)
    max_tokens: int = 256
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    schema: dict | None = None  # JSON schema the answer must follow (constrained decoding)
    seed: int | None = None
    model: str = ""  # the model name a client asked for (the router sends the fallback's name straight there)
    logprobs: bool = True  # per-token log-probs wanted (costs a logits copy per step in batched offline generation)

    def key(self) -> dict:
        """What decides the answer (for cache keys): everything but the client's model name."""
        out = asdict(self)
        out.pop("model")
        return out

    def sampling(self) -> tuple:
        """Requests with equal sampling settings can share one batched generate() call."""
        return (self.max_tokens, self.temperature, self.top_p if self.temperature > 0 else 1.0, tuple(self.stop),
                json.dumps(self.schema, sort_keys=True) if self.schema is not None else None)


@dataclass
class Result:
    text: str
    model: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: str = "stop"  # stop | length
    tokens: list[str] = field(default_factory=list)  # each generated token's text
    logprobs: list[float] | None = None  # per generated token, from the model's raw distribution; None when unknown
    token_ids: list[int] = field(default_factory=list)  # generated ids (an end-of-generation token included)

    @property
    def usage(self) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens}
