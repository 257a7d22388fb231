"""Engines answer a GenRequest: the model in process (transformers) or any OpenAI-compatible server (llama.cpp, vLLM,
another slmforge). Both report per-token log-probs when they can; the router needs them for its confidence."""

from __future__ import annotations

import asyncio
import atexit
import json
import threading
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from typing import AsyncIterator

from slmforge.serve.protocol import APIError, GenRequest, Generation

_DONE = object()


def holdback_split(text: str, stops: list[str]) -> int:
    """How much of `text` is safe to stream: never the beginning of a stop sequence that may still complete."""
    return max(0, len(text) - max((len(s) for s in stops), default=1) + 1) if stops else len(text)


def cut_at_stop(text: str, stops: list[str]) -> tuple[str, bool]:
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return (text[: min(hits)], True) if hits else (text, False)


# ------------------------------------------------------------------------------------------ guided decoding
class Guided:
    """JSON-schema constrained decoding with outlines' logits processor inside transformers' generate."""

    def __init__(self, model, tokenizer, cache_size: int = 32):
        import outlines
        from outlines.backends.outlines_core import OutlinesCoreBackend

        self.backend = OutlinesCoreBackend(outlines.from_transformers(model, tokenizer))  # vocabulary index, built once
        self.cache: OrderedDict[str, object] = OrderedDict()  # schema -> compiled processor (compiling costs ~0.1-1 s)
        self.cache_size = cache_size

    def processor(self, schema: dict):
        key = json.dumps(schema, sort_keys=True)
        proc = self.cache.pop(key, None)
        if proc is None:
            try:
                proc = self.backend.get_json_schema_logits_processor(key)
            except Exception as err:  # outlines raises various types for schemas it cannot compile
                raise APIError(400, f"response_format: this JSON schema cannot be enforced: {err}", "response_format") from None
        self.cache[key] = proc
        while len(self.cache) > self.cache_size:
            self.cache.popitem(last=False)
        proc.reset()  # a processor keeps per-generation state; generation is serialized, so one instance per schema is safe
        return proc


# ------------------------------------------------------------------------------------------ in process
class LocalEngine:
    """A transformers model in this process. One generation at a time on a worker thread: on CPU the matrix
    multiplies already use every core, and the event loop stays free for other requests and /health."""

    def __init__(self, model, tokenizer, name: str):
        self.model, self.tok, self.name = model.eval(), tokenizer, name
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="generate")
        self.max_context = int(getattr(model.config, "max_position_embeddings", 4096) or 4096)
        eos = model.generation_config.eos_token_id if model.generation_config.eos_token_id is not None else tokenizer.eos_token_id
        self.eos = set(eos if isinstance(eos, list) else [eos])
        self._guided: Guided | None = None
        self._guided_lock = threading.Lock()

    @property
    def guided(self) -> Guided:
        with self._guided_lock:
            if self._guided is None:
                self._guided = Guided(self.model, self.tok)
            return self._guided

    def tokenize(self, req: GenRequest) -> list[int]:
        if req.messages is not None:
            if not getattr(self.tok, "chat_template", None):
                raise APIError(400, "this model has no chat template: use /v1/completions", "messages")
            return list(self.tok.apply_chat_template(req.messages, add_generation_prompt=True, tokenize=True,
                                                     return_dict=True)["input_ids"])
        return list(self.tok(req.prompt)["input_ids"])

    def encode(self, req: GenRequest) -> list[int]:
        """The prompt's token ids, or the 400 that explains why it cannot be served."""
        ids = self.tokenize(req)
        if not ids:
            raise APIError(400, "the prompt is empty", "prompt")
        if len(ids) + req.max_tokens > self.max_context:
            raise APIError(400, f"prompt ({len(ids)} tokens) + max_tokens ({req.max_tokens}) exceeds the served context "
                                f"of {self.max_context} tokens", "max_tokens", "context_length_exceeded")
        return ids

    async def validate(self, req: GenRequest) -> None:
        """Raise the request's 4xx before a streamed response has started (context length, uncompilable schema)."""
        self.encode(req)
        if req.schema is not None:
            await asyncio.get_running_loop().run_in_executor(self.pool, self.guided.processor, req.schema)

    def _generate(self, req: GenRequest, ids: list[int], on_text=None, cancel: threading.Event | None = None) -> Generation:
        import torch
        from transformers import LogitsProcessorList, StoppingCriteria, StoppingCriteriaList
        from transformers.generation.streamers import BaseStreamer

        class Cancelled(StoppingCriteria):  # the client went away: stop spending CPU on it
            def __call__(self, input_ids, scores, **kw):
                return torch.full((input_ids.shape[0],), bool(cancel and cancel.is_set()), dtype=torch.bool)

        class Streamer(BaseStreamer):  # incremental decode; holds back an unfinished UTF-8 character
            def __init__(self):
                self.ids, self.sent, self.first = [], 0, True

            def put(self, value):
                if self.first:  # the prompt comes first
                    self.first = False
                    return
                self.ids += value.reshape(-1).tolist()
                text = tok.decode(self.ids, skip_special_tokens=True)
                if not text.endswith("\ufffd") and len(text) > self.sent:
                    on_text(text[self.sent:])
                    self.sent = len(text)

            def end(self):
                pass

        tok = self.tok
        kwargs = dict(max_new_tokens=req.max_tokens, output_logits=True, return_dict_in_generate=True,
                      pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else next(iter(self.eos)),
                      stopping_criteria=StoppingCriteriaList([Cancelled()]))
        if req.temperature > 0:
            kwargs.update(do_sample=True, temperature=req.temperature, top_p=req.top_p)
        else:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        if req.stop:
            kwargs.update(stop_strings=req.stop, tokenizer=tok)
        if req.schema is not None:
            kwargs["logits_processor"] = LogitsProcessorList([self.guided.processor(req.schema)])
        if on_text is not None:
            kwargs["streamer"] = Streamer()
        if req.seed is not None:
            torch.manual_seed(req.seed)
        x = torch.tensor([ids], device=self.model.device)
        with torch.no_grad():
            out = self.model.generate(input_ids=x, attention_mask=torch.ones_like(x), **kwargs)
        new = out.sequences[0, len(ids):].tolist()
        # Confidence uses the model's own distribution (raw logits, before sampling warpers and the schema mask).
        logits = torch.stack(out.logits)[:, 0, :].float()
        logprobs = torch.log_softmax(logits, -1).gather(1, torch.tensor(new, device=logits.device)[:, None])[:, 0].tolist()
        text, stopped = cut_at_stop(tok.decode(new, skip_special_tokens=True), req.stop)
        ended = bool(new) and new[-1] in self.eos
        finish = "stop" if stopped or ended or len(new) < req.max_tokens else "length"
        return Generation(text=text, model=self.name, prompt_tokens=len(ids), completion_tokens=len(new),
                          finish_reason=finish, tokens=[tok.decode([t]) for t in new], logprobs=logprobs)

    async def complete(self, req: GenRequest) -> Generation:
        ids = self.encode(req)
        return await asyncio.get_running_loop().run_in_executor(self.pool, self._generate, req, ids)

    def answer(self, req: GenRequest) -> Generation:
        """Synchronous generation, for callers without an event loop (the llama.cpp teacher, benches)."""
        return self._generate(req, self.encode(req))

    async def stream(self, req: GenRequest) -> AsyncIterator[str | Generation]:
        """Text deltas as tokens are generated, then the final Generation."""
        loop = asyncio.get_running_loop()
        ids = self.encode(req)
        queue: asyncio.Queue = asyncio.Queue()
        cancel = threading.Event()

        def work():
            try:
                return self._generate(req, ids, lambda s: loop.call_soon_threadsafe(queue.put_nowait, s), cancel)
            finally:
                loop.call_soon_threadsafe(queue.put_nowait, _DONE)

        future = loop.run_in_executor(self.pool, work)
        text, sent = "", 0
        try:
            while (item := await queue.get()) is not _DONE:
                text += item
                safe = holdback_split(text, req.stop)
                if safe > sent and not cut_at_stop(text, req.stop)[1]:
                    yield text[sent:safe]
                    sent = safe
            final = await future
            if len(final.text) > sent:
                yield final.text[sent:]
            yield final
        finally:
            cancel.set()  # no-op when finished; stops generation when the client disconnected


# ------------------------------------------------------------------------------------------ llama.cpp in process
def open_llama(gguf_path, n_ctx: int, n_threads: int | None = None):
    """llama-cpp-python's Llama on a GGUF file, on every core this process may use, quiet."""
    from llama_cpp import Llama

    from slmforge.models import cpu_threads

    threads = n_threads or cpu_threads()
    return Llama(model_path=str(gguf_path), n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads, verbose=False)


def llama_steps(llm, ids: list[int], temperature: float = 0.0, top_p: float = 1.0, grammar=None):
    """(token, log-prob, end-of-generation) per generated token, ending after an end-of-generation token.
    OpenAI sampling semantics: only temperature and top_p (llama.cpp's top_k, min_p and repeat penalty are off).
    The log-prob comes from the logits the token was drawn from, raw (before temperature and the grammar mask), as
    LocalEngine reports it; reading the last output row needs no logits_all buffer."""
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


class LlamaCppEngine(LocalEngine):
    """A GGUF file run by llama.cpp in this process (the compiled llama-cpp-python, extra `llamacpp`): quantized weights
    and llama.cpp's CPU kernels, several times faster than transformers on a laptop CPU (bench/serve_engines.py).

    We drive llama-cpp-python's token generator rather than its create_completion so this engine behaves like
    LocalEngine: the same stop-string, streaming and cancellation code, exact token counts, and the confidence the
    router needs read from the raw logits of each step (create_completion's logprobs would need logits_all, i.e.
    the LM head over every prompt token and an n_ctx x vocab buffer). JSON schemas become llama.cpp grammars.
    complete(), answer() and stream() are LocalEngine's: one worker thread, the same queue, hold-back and cancellation."""

    def __init__(self, gguf_path: str, name: str, n_ctx: int = 4096, n_threads: int | None = None, cache_size: int = 32):
        # (LocalEngine.__init__ is not called: there is no transformers model here)
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        self.llm = open_llama(gguf_path, n_ctx, n_threads)
        atexit.register(self.llm.close)  # freed before interpreter teardown, where its __del__ would print a TypeError
        self.name, self.path = name, str(gguf_path)
        self.max_context = self.llm.n_ctx()
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="generate")
        template = self.llm.metadata.get("tokenizer.chat_template")
        text = lambda t: self.llm._model.token_get_text(t) if t != -1 else ""  # noqa: E731  (no public accessor)
        self.formatter = Jinja2ChatFormatter(template=template, eos_token=text(self.llm.token_eos()),
                                             bos_token=text(self.llm.token_bos())) if template else None
        self.grammars: OrderedDict[str, object] = OrderedDict()  # schema -> compiled grammar (reusable across requests)
        self.cache_size = cache_size

    def tokenize(self, req: GenRequest) -> list[int]:
        if req.messages is not None:
            if self.formatter is None:
                raise APIError(400, "this model has no chat template: use /v1/completions", "messages")
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
                raise APIError(400, f"response_format: this JSON schema cannot be enforced: {err}", "response_format") from None
        self.grammars[key] = grammar
        while len(self.grammars) > self.cache_size:
            self.grammars.popitem(last=False)
        return grammar

    async def validate(self, req: GenRequest) -> None:
        self.encode(req)
        if req.schema is not None:
            self.grammar(req.schema)

    def _generate(self, req: GenRequest, ids: list[int], on_text=None, cancel: threading.Event | None = None) -> Generation:
        llm = self.llm
        if req.seed is not None:
            llm.set_seed(req.seed)
        grammar = self.grammar(req.schema) if req.schema is not None else None
        new, logprobs, data, sent = [], [], b"", 0
        finish = "length"
        for token, logprob, eog in llama_steps(llm, ids, req.temperature, req.top_p, grammar):
            logprobs.append(logprob)
            new.append(token)
            if eog:  # counted, like transformers' engine; no text
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
            if len(new) >= req.max_tokens or (cancel is not None and cancel.is_set()):
                break
        text, _ = cut_at_stop(data.decode("utf-8", errors="replace"), req.stop)
        return Generation(text=text, model=self.name, prompt_tokens=len(ids), completion_tokens=len(new),
                          finish_reason=finish, tokens=[llm.detokenize([t]).decode("utf-8", errors="replace") for t in new],
                          logprobs=logprobs)



# ------------------------------------------------------------------------------------------ remote
class RemoteEngine:
    """Any OpenAI-compatible endpoint. Asks for log-probs so the router can judge confidence."""

    def __init__(self, base_url: str, model: str, api_key: str | None = None, timeout_s: float = 120.0, name: str | None = None):
        import httpx

        self.base_url, self.model, self.name = base_url.rstrip("/"), model, name or model or base_url
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        limits = httpx.Limits(max_connections=256, max_keepalive_connections=64)
        self.client = httpx.AsyncClient(base_url=self.base_url, timeout=timeout_s, headers=headers, limits=limits)

    async def validate(self, req: GenRequest) -> None:
        pass  # the backend checks its own context length and schema

    def _request(self, req: GenRequest, stream: bool) -> tuple[str, dict]:
        body = {"model": self.model, "max_tokens": req.max_tokens, "temperature": req.temperature, "stream": stream}
        if req.temperature > 0:
            body["top_p"] = req.top_p
        if req.stop:
            body["stop"] = req.stop
        if req.seed is not None:
            body["seed"] = req.seed
        if req.messages is not None:
            body.update(messages=req.messages, logprobs=not stream)
            if req.schema is not None:
                body["response_format"] = {"type": "json_schema", "json_schema": {"name": "response", "schema": req.schema}}
            return "/chat/completions", body
        body.update(prompt=req.prompt)
        if not stream:
            body["logprobs"] = 0
        return "/completions", body

    def _error(self, status: int, text: str) -> APIError:
        msg = f"{self.name} answered HTTP {status}: {text[:300]}"
        return APIError(status if 400 <= status < 500 and status not in (401, 403) else 502, msg, code="backend_error")

    async def complete(self, req: GenRequest) -> Generation:
        import httpx

        path, body = self._request(req, stream=False)
        try:
            r = await self.client.post(path, json=body)
        except httpx.HTTPError as err:
            raise APIError(502, f"{self.name} is unreachable: {type(err).__name__}: {err}", code="backend_unreachable") from None
        if r.status_code >= 400:
            raise self._error(r.status_code, r.text)
        data = r.json()
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
        return Generation(text=text or "", model=data.get("model") or self.name, prompt_tokens=usage.get("prompt_tokens", 0),
                          completion_tokens=usage.get("completion_tokens", len(tokens)),
                          finish_reason=choice.get("finish_reason") or "stop", tokens=tokens, logprobs=logprobs)

    async def stream(self, req: GenRequest) -> AsyncIterator[str | Generation]:
        import httpx

        path, body = self._request(req, stream=True)
        body["stream_options"] = {"include_usage": True}
        parts, model, finish, usage = [], self.name, "stop", {}
        try:
            async with self.client.stream("POST", path, json=body) as r:
                if r.status_code >= 400:
                    raise self._error(r.status_code, (await r.aread()).decode(errors="replace"))
                async for line in r.aiter_lines():
                    if not line.startswith("data:"):
                        continue
                    payload = line[5:].strip()
                    if payload == "[DONE]":
                        break
                    chunk = json.loads(payload)
                    model = chunk.get("model") or model
                    usage = chunk.get("usage") or usage
                    for choice in chunk.get("choices") or []:
                        delta = choice.get("delta", {}).get("content") if req.messages is not None else choice.get("text")
                        if delta:
                            parts.append(delta)
                            yield delta
                        finish = choice.get("finish_reason") or finish
        except httpx.HTTPError as err:
            raise APIError(502, f"{self.name} is unreachable: {type(err).__name__}: {err}", code="backend_unreachable") from None
        yield Generation(text="".join(parts), model=model, prompt_tokens=usage.get("prompt_tokens", 0),
                         completion_tokens=usage.get("completion_tokens", len(parts)), finish_reason=finish)

    async def aclose(self) -> None:
        await self.client.aclose()
