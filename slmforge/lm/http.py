"""Any OpenAI-compatible server (vLLM, llama.cpp's server, Ollama, OpenAI, another slmforge) through one HTTP client.

HTTPClient (httpx): timeouts, retries with jittered exponential backoff on 408/409/429/5xx, timeouts, transport errors
and malformed replies; a client error (other 4xx) is final at once. The API key lives only in the request headers:
never in repr, identity() (cache keys), error messages or logs. We write the retry loop ourselves because the
`openai` client retries neither malformed bodies nor each attempt under our own deadline, and would add a dependency
to the core for two endpoints.
"""

from __future__ import annotations

import asyncio
import json
import random
from typing import AsyncIterator

from slmforge.lm.base import LM
from slmforge.lm.types import LMError, Request, Result


class _Retryable(Exception):
    pass


class HTTPClient:
    def __init__(self, base_url: str, api_key: str | None = None, *, timeout_s: float = 60.0, max_retries: int = 3,
                 backoff_s: float = 0.5, max_connections: int = 256, name: str = ""):
        self.base_url = base_url.rstrip("/")
        self.timeout_s, self.max_retries, self.backoff_s = timeout_s, max_retries, backoff_s
        self.name = name or self.base_url
        self._key = api_key  # only ever sent, in the Authorization header
        self._max_connections = max_connections
        self._client = None

    def __repr__(self) -> str:
        return f"HTTPClient(base_url={self.base_url!r})"

    def _http(self):
        import httpx

        if self._client is None:  # created on first use, inside the event loop that uses it
            headers = {"Authorization": f"Bearer {self._key}"} if self._key else {}
            limits = httpx.Limits(max_connections=self._max_connections, max_keepalive_connections=min(64, self._max_connections))
            self._client = httpx.AsyncClient(base_url=self.base_url, headers=headers, timeout=self.timeout_s, limits=limits)
        return self._client

    def _status_error(self, status: int, text: str) -> LMError:
        # the backend's auth failure is ours to fix, not the client's: 502, like any other backend failure
        code = status if 400 <= status < 500 and status not in (401, 403) else 502
        return LMError(code, f"{self.name} answered HTTP {status}: {text[:300]}", code="backend_error")

    async def _backoff(self, attempt: int) -> None:
        await asyncio.sleep(self.backoff_s * 2**attempt * (0.5 + random.random()))  # jittered: retries do not align

    async def post(self, path: str, body: dict, parse=lambda data: data):
        """`parse` of the JSON reply to a POST, retried on transient failures and on replies `parse` cannot read
        (ValueError, KeyError, IndexError, TypeError); LMError when it failed for good."""
        import httpx

        last, unreachable = "no attempt", False
        for attempt in range(self.max_retries + 1):
            try:
                r = await self._http().post(path, json=body)
                if r.status_code in (408, 409, 429) or r.status_code >= 500:
                    raise _Retryable(f"HTTP {r.status_code}: {r.text[:200]}")
                if r.status_code >= 400:
                    raise self._status_error(r.status_code, r.text)  # a client error will not heal
                return parse(r.json())
            except httpx.TimeoutException:
                last, unreachable = f"timeout after {self.timeout_s}s", False
            except httpx.TransportError as err:
                last, unreachable = f"{type(err).__name__}: {err}", True
            except _Retryable as err:
                last, unreachable = str(err), False
            except (ValueError, KeyError, IndexError, TypeError) as err:
                last, unreachable = f"malformed reply ({type(err).__name__}: {err})", False
            if attempt < self.max_retries:
                await self._backoff(attempt)
        what = "is unreachable" if unreachable else "failed"
        return_code = "backend_unreachable" if unreachable else "backend_error"
        raise LMError(502, f"{self.name} {what}: {last} (after {self.max_retries + 1} attempts)", code=return_code)

    async def stream_lines(self, path: str, body: dict) -> AsyncIterator[dict]:
        """Server-sent events of a streamed POST, as parsed JSON. Connecting is retried; once data flowed, an error is final
        (the consumer already holds part of the answer)."""
        import httpx

        for attempt in range(self.max_retries + 1):
            started = False
            try:
                async with self._http().stream("POST", path, json=body) as r:
                    if r.status_code >= 400:
                        text = (await r.aread()).decode(errors="replace")
                        if (r.status_code in (408, 409, 429) or r.status_code >= 500) and attempt < self.max_retries:
                            raise _Retryable(text)
                        raise self._status_error(r.status_code, text)
                    async for line in r.aiter_lines():
                        if not line.startswith("data:"):
                            continue
                        payload = line[5:].strip()
                        if payload == "[DONE]":
                            return
                        try:
                            chunk = json.loads(payload)
                        except ValueError:
                            raise LMError(502, f"{self.name} sent a malformed stream event: {payload[:200]}", code="backend_error") from None
                        started = True
                        yield chunk
                    return
            except (_Retryable, httpx.TransportError) as err:
                if started or attempt >= self.max_retries:
                    if isinstance(err, _Retryable):
                        raise LMError(502, f"{self.name} failed: {err}", code="backend_error") from None
                    raise LMError(502, f"{self.name} is unreachable: {type(err).__name__}: {err}", code="backend_unreachable") from None
                await self._backoff(attempt)

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None


class OpenAILM(LM):
    """An OpenAI-compatible endpoint. Asks for log-probs (the router needs them for its confidence)."""

    def __init__(self, base_url: str, model: str, api_key: str | None = None, *, timeout_s: float = 60.0,
                 max_retries: int = 3, backoff_s: float = 0.5, concurrency: int = 4, name: str | None = None):
        self.base_url, self.model = base_url.rstrip("/"), model
        self.name = name or model or self.base_url
        self.concurrency = concurrency
        self.batch_hint = concurrency * 4
        self._settings = dict(api_key=api_key, timeout_s=timeout_s, max_retries=max_retries, backoff_s=backoff_s, name=self.name)
        self.client = HTTPClient(self.base_url, **self._settings)  # for the event loop of a server (complete/stream)

    def __repr__(self) -> str:
        return f"OpenAILM(base_url={self.base_url!r}, model={self.model!r})"

    def identity(self) -> dict:
        return {"backend": "openai", "base_url": self.base_url, "model": self.model}

    def describe(self) -> str:
        return self.base_url

    @property
    def endpoint(self) -> str:
        return f"{self.base_url}/chat/completions (model {self.model})"

    def body(self, req: Request, stream: bool) -> tuple[str, dict]:
        body = {"model": self.model, "max_tokens": req.max_tokens, "temperature": req.temperature, "stream": stream}
        if req.temperature > 0 and req.top_p < 1:
            body["top_p"] = req.top_p
        if req.stop:
            body["stop"] = req.stop
        if req.seed is not None:
            body["seed"] = req.seed
        if req.messages is not None:
            body["messages"] = req.messages
            if req.logprobs and not stream:
                body["logprobs"] = True
            if req.schema is not None:
                body["response_format"] = {"type": "json_schema", "json_schema": {"name": "response", "schema": req.schema}}
            return "/chat/completions", body
        if req.prompt is None:
            raise LMError(400, "an OpenAI-compatible server takes messages or a text prompt, not token ids", "prompt")
        body["prompt"] = req.prompt
        if req.logprobs and not stream:
            body["logprobs"] = 0
        if stream:
            body["stream_options"] = {"include_usage": True}
        return "/completions", body

    def _result(self, req: Request, data: dict) -> Result:
        choice = data["choices"][0]
        usage = data.get("usage") or {}
        tokens, logprobs = [], None
        lp = choice.get("logprobs")
        if req.messages is not None and lp and lp.get("content") is not None:
            tokens = [c.get("token", "") for c in lp["content"]]
            logprobs = [float(c["logprob"]) for c in lp["content"]]
        elif req.messages is None and lp and lp.get("token_logprobs") is not None:
            tokens, logprobs = list(lp.get("tokens") or []), [float(x) for x in lp["token_logprobs"] if x is not None]
        text = choice["message"]["content"] if req.messages is not None else choice["text"]
        if not isinstance(text, str):
            raise ValueError("content is not text")
        return Result(text=text, model=data.get("model") or self.name, prompt_tokens=usage.get("prompt_tokens", 0),
                      completion_tokens=usage.get("completion_tokens", len(tokens)),
                      finish_reason=choice.get("finish_reason") or "stop", tokens=tokens, logprobs=logprobs)

    async def _complete(self, client: HTTPClient, req: Request) -> Result:
        path, body = self.body(req, stream=False)
        return await client.post(path, body, lambda data: self._result(req, data))

    async def complete(self, req: Request) -> Result:
        return await self._complete(self.client, req)

    async def stream(self, req: Request) -> AsyncIterator[str | Result]:
        path, body = self.body(req, stream=True)
        parts, model, finish, usage = [], self.name, "stop", {}
        async for chunk in self.client.stream_lines(path, body):
            model = chunk.get("model") or model
            usage = chunk.get("usage") or usage
            for choice in chunk.get("choices") or []:
                delta = (choice.get("delta") or {}).get("content") if req.messages is not None else choice.get("text")
                if delta:
                    parts.append(delta)
                    yield delta
                finish = choice.get("finish_reason") or finish
        yield Result(text="".join(parts), model=model, prompt_tokens=usage.get("prompt_tokens", 0),
                     completion_tokens=usage.get("completion_tokens", len(parts)), finish_reason=finish)

    def generate(self, requests: list[Request]) -> list[Result | LMError]:
        return asyncio.run(self._generate_all(requests))

    async def _generate_all(self, requests: list[Request]) -> list[Result | LMError]:
        client = HTTPClient(self.base_url, max_connections=self.concurrency, **self._settings)  # this loop's own client
        sem = asyncio.Semaphore(self.concurrency)

        async def one(req: Request) -> Result | LMError:
            async with sem:
                try:
                    return await self._complete(client, req)
                except LMError as err:
                    return err

        try:
            return list(await asyncio.gather(*(one(r) for r in requests)))
        finally:
            await client.aclose()

    async def aclose(self) -> None:
        await self.client.aclose()
