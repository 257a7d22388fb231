"""The protocol every backend implements, and the streaming plumbing the in-process backends share.

A backend writes `generate` (a batch, in order, failures as LMError values: the offline callers' entry) and
`complete` / `stream` (one request on the event loop: serving's entry). Like lm-evaluation-harness's `LM`, the base
class is small on purpose; anything cross-cutting (caching, routing) wraps an LM instead of subclassing it.
"""

from __future__ import annotations

import asyncio
import threading
from typing import AsyncIterator, Callable

from slmforge.lm.types import LMError, Request, Result

_DONE = object()


def holdback_split(text: str, stops: list[str]) -> int:
    """How much of `text` is safe to stream: never the beginning of a stop sequence that may still complete."""
    return max(0, len(text) - max((len(s) for s in stops), default=1) + 1) if stops else len(text)


def cut_at_stop(text: str, stops: list[str]) -> tuple[str, bool]:
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return (text[: min(hits)], True) if hits else (text, False)


class LM:
    name: str = "lm"  # what results are labelled with (a teacher's `origin`, the served model name)
    batch_hint: int = 8  # requests worth handing to generate() at once

    def identity(self) -> dict:
        """What makes two LMs give the same answer to the same request (response cache keys). No secrets, no paths."""
        raise NotImplementedError

    def describe(self) -> str:
        return type(self).__name__

    def tokenize(self, req: Request) -> list[int]:
        """The prompt's token ids (in-process backends)."""
        raise NotImplementedError

    def encode(self, req: Request) -> list[int]:
        """The prompt's token ids, or the 400 that explains why it cannot be served (in-process backends, which set
        `max_context`)."""
        ids = self.tokenize(req)
        if not ids:
            raise LMError(400, "the prompt is empty", "prompt")
        if len(ids) + req.max_tokens > self.max_context:
            raise LMError(400, f"prompt ({len(ids)} tokens) + max_tokens ({req.max_tokens}) exceeds the served context "
                               f"of {self.max_context} tokens", "max_tokens", "context_length_exceeded")
        return ids

    @property
    def endpoint(self) -> str:
        """Where the answers come from (a URL, a model folder, a GGUF file), for error messages."""
        return self.describe()

    def generate(self, requests: list[Request]) -> list[Result | LMError]:
        """Answers in request order; a request that failed for good is an LMError in its place."""
        raise NotImplementedError

    async def validate(self, req: Request) -> None:
        """Raise the request's 4xx before a streamed response has started (context length, uncompilable schema)."""

    async def complete(self, req: Request) -> Result:
        out = (await asyncio.to_thread(self.generate, [req]))[0]
        if isinstance(out, LMError):
            raise out
        return out

    async def stream(self, req: Request) -> AsyncIterator[str | Result]:
        """Text deltas as tokens are generated, then the final Result."""
        result = await self.complete(req)
        if result.text:
            yield result.text
        yield result

    async def aclose(self) -> None:
        pass


async def stream_from_thread(start: Callable[[Callable[[str], None], threading.Event], "asyncio.Future"],
                             stops: list[str]) -> AsyncIterator[str | Result]:
    """Stream a generation that runs on another thread. `start(on_text, cancel)` begins it and returns an awaitable of
    its Result; `on_text` receives decoded text deltas from that thread. Text that may be the start of a stop sequence
    is held back; `cancel` is set when the consumer goes away (client disconnect), which stops the generation."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()
    cancel = threading.Event()
    future = start(lambda s: loop.call_soon_threadsafe(queue.put_nowait, s), cancel)
    future.add_done_callback(lambda _f: loop.call_soon_threadsafe(queue.put_nowait, _DONE))
    text, sent = "", 0
    try:
        while (item := await queue.get()) is not _DONE:
            text += item
            safe = holdback_split(text, stops)
            if safe > sent and not cut_at_stop(text, stops)[1]:
                yield text[sent:safe]
                sent = safe
        final = await future
        if len(final.text) > sent:
            yield final.text[sent:]
        yield final
    finally:
        cancel.set()  # no-op when finished; stops generation when the client disconnected
