"""A GGUF file run by llama.cpp in this process (the compiled llama-cpp-python, extra `llamacpp`): quantized weights
and llama.cpp's CPU kernels, several times faster than transformers on a laptop CPU (bench/serve_engines.py).

We drive llama-cpp-python's token generator rather than its create_completion, so this backend behaves like the
transformers one: the same stop-string, streaming and cancellation code, exact token counts, and the confidence the
router needs read from the raw logits of each step (create_completion's logprobs would need logits_all, i.e. the LM
head over every prompt token and an n_ctx x vocab buffer). JSON schemas become llama.cpp grammars.

Requests run one at a time: llama-cpp-python's `Llama` holds one sequence in its context; decoding several at once
would mean driving llama.cpp's batch API (llama_batch with per-sequence ids and KV-cache bookkeeping) by hand, which
we have not done. Concurrent requests wait in a bounded queue (503 + Retry-After when it is full).
"""

from __future__ import annotations

import asyncio
import atexit
import json
import threading
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import AsyncIterator

from slmforge.lm.base import LM, cut_at_stop, stream_from_thread
from slmforge.lm.identity import weights_hash
from slmforge.lm.types import LMError, Request, Result


def open_llama(gguf_path, n_ctx: int, n_threads: int | None = None):
    """llama-cpp-python's Llama on a GGUF file, on every core this process may use, quiet."""
    from llama_cpp import Llama

    from slmforge.models import cpu_threads

    threads = n_threads or cpu_threads()
    return Llama(model_path=str(gguf_path), n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads, verbose=False)


def llama_steps(llm, ids: list[int], temperature: float = 0.0, top_p: float = 1.0, grammar=None):
    """(token, log-prob, end-of-generation) per generated token, ending after an end-of-generation token.
    OpenAI sampling semantics: only temperature and top_p (llama.cpp's top_k, min_p and repeat penalty are off).
    The log-prob comes from the logits the token was drawn from, raw (before temperature and the grammar mask), as the
    transformers backend reports it; reading the last output row needs no logits_all buffer."""
    import llama_cpp
    import numpy as np

    vocab = llm.n_vocab()
    for token in llm.generate(ids, temp=temperature, top_p=top_p if temperature > 0 else 1.0, top_k=0, min_p=0.0,
                              repeat_penalty=1.0, grammar=grammar):
        row = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(vocab,)).astype(np.float64)
        peak = row.max()
        eog = bool(llama_cpp.llama_vocab_is_eog(llm._model.vocab, token))
        yield token, float(row[token] - peak - np.log(np.exp(row - peak).sum())), eog
        if eog:
            return


class LlamaCppLM(LM):
    batch_hint = 1

    def __init__(self, gguf_path: str | Path, name: str, n_ctx: int = 4096, n_threads: int | None = None,
                 cache_size: int = 32, max_queue: int = 64):
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        self.llm = open_llama(gguf_path, n_ctx, n_threads)
        atexit.register(self.llm.close)  # freed before interpreter teardown, where its __del__ would print a TypeError
        self.name, self.path = name, str(gguf_path)
        self.max_context = self.llm.n_ctx()
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="llamacpp")
        self.max_queue, self.in_flight, self._lock = max_queue, 0, threading.Lock()
        template = self.llm.metadata.get("tokenizer.chat_template")
        text = lambda t: self.llm._model.token_get_text(t) if t != -1 else ""  # noqa: E731  (no public accessor)
        self.formatter = Jinja2ChatFormatter(template=template, eos_token=text(self.llm.token_eos()),
                                             bos_token=text(self.llm.token_bos())) if template else None
        self.grammars: OrderedDict[str, object] = OrderedDict()  # schema -> compiled grammar (reusable across requests)
        self.cache_size = cache_size

    def identity(self) -> dict:
        return {"backend": "llamacpp", "weights": weights_hash(self.path)}

    def describe(self) -> str:
        return f"llama.cpp in process ({Path(self.path).name})"

    def tokenize(self, req: Request) -> list[int]:
        if req.prompt_ids is not None:
            return list(req.prompt_ids)
        if req.messages is not None:
            if self.formatter is None:
                raise LMError(400, "this model has no chat template: use /v1/completions", "messages")
            rendered = self.formatter(messages=req.messages)
            return self.llm.tokenize(rendered.prompt.encode("utf-8"), add_bos=not rendered.added_special, special=True)
        return self.llm.tokenize(req.prompt.encode("utf-8"), add_bos=True, special=False) if req.prompt else []

    def grammar(self, schema: dict):
        from llama_cpp import LlamaGrammar

        key = json.dumps(schema, sort_keys=True)
        grammar = self.grammars.pop(key, None)
        if grammar is None:
            try:
                grammar = LlamaGrammar.from_json_schema(key, verbose=False)
            except Exception as err:  # llama.cpp's schema converter raises various types
                raise LMError(400, f"response_format: this JSON schema cannot be enforced: {err}", "response_format") from None
        self.grammars[key] = grammar
        while len(self.grammars) > self.cache_size:
            self.grammars.popitem(last=False)
        return grammar

    def _check_capacity(self) -> None:
        if self.in_flight >= self.max_queue:
            raise LMError(503, f"the server is busy: {self.in_flight} requests wait or run (serve.max_queue {self.max_queue}); "
                               "retry shortly", code="queue_full", retry_after=1)

    async def validate(self, req: Request) -> None:
        self.encode(req)
        self._check_capacity()
        if req.schema is not None:
            self.grammar(req.schema)

    def run(self, req: Request, ids: list[int], on_text=None, cancel: threading.Event | None = None) -> Result:
        llm = self.llm
        if req.seed is not None:
            llm.set_seed(req.seed)
        grammar = self.grammar(req.schema) if req.schema is not None else None
        new, logprobs, data, sent = [], [], b"", 0
        finish = "length"
        for token, logprob, eog in llama_steps(llm, ids, req.temperature, req.top_p, grammar):
            logprobs.append(logprob)
            new.append(token)
            if eog:  # counted, like the transformers backend; no text
                finish = "stop"
                break
            data += llm.detokenize([token], prev_tokens=ids + new[:-1])
            text = data.decode("utf-8", errors="ignore")  # an unfinished UTF-8 character waits for its next bytes
            if req.stop and cut_at_stop(text, req.stop)[1]:
                finish = "stop"
                break
            if on_text is not None and len(text) > sent:
                on_text(text[sent:])
                sent = len(text)
            if len(new) >= req.max_tokens or (cancel is not None and cancel.is_set()):  # cancel: the client went away
                break
        text, _ = cut_at_stop(data.decode("utf-8", errors="replace"), req.stop)
        return Result(text=text, model=self.name, prompt_tokens=len(ids), completion_tokens=len(new), finish_reason=finish,
                      tokens=[llm.detokenize([t]).decode("utf-8", errors="replace") for t in new], logprobs=logprobs,
                      token_ids=new)

    def generate(self, requests: list[Request]) -> list[Result | LMError]:
        out: list[Result | LMError] = []
        for req in requests:
            try:
                out.append(self.run(req, self.encode(req)))
            except LMError as err:
                out.append(err)
            except (RuntimeError, ValueError) as err:
                out.append(LMError(500, f"llama.cpp failed: {err}", code="generation_failed"))
        return out

    def answer(self, req: Request) -> Result:
        return self.run(req, self.encode(req))

    def close(self) -> None:
        self.pool.shutdown(wait=True)
        self.llm.close()

    def _submit(self, req: Request, ids: list[int], on_text=None, cancel=None) -> asyncio.Future:
        with self._lock:
            self._check_capacity()
            self.in_flight += 1

        def work():
            try:
                return self.run(req, ids, on_text, cancel)
            finally:
                with self._lock:
                    self.in_flight -= 1

        return asyncio.get_running_loop().run_in_executor(self.pool, work)

    async def complete(self, req: Request) -> Result:
        return await self._submit(req, self.encode(req))

    def stream(self, req: Request) -> AsyncIterator[str | Result]:
        ids = self.encode(req)
        return stream_from_thread(lambda on_text, cancel: self._submit(req, ids, on_text, cancel), req.stop)
