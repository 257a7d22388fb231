"""A transformers model in this process.

Two ways in, one model:
  generate(requests)   offline callers (the teacher, DAPT replay, export's check): requests with equal sampling settings
                       go through one left-padded `model.generate` call per batch (the only `generate` call in slmforge)
  complete / stream    serving: a scheduler thread decodes every waiting request together (continuous batching, below)

Continuous batching. transformers' own continuous batching (`generate_batch`, paged attention) has no per-request
streaming, stop strings, log-probs or cancellation and targets CUDA, so the scheduler drives the model's forward
directly: one DynamicCache over the running rows (left-padded to one length), one decode step for all of them, each
row sampled with its own settings and generator. Requests that arrive while others run are prefilled as a small batch
and joined at the next step; finished or cancelled rows leave at once. A JSON-schema request needs outlines' logits
processor inside `generate`, so it runs alone, between batches. The queue of waiting requests is bounded: when full,
submit() raises a 503 with Retry-After.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator, Callable

from slmforge.lm.base import LM, cut_at_stop, stream_from_thread
from slmforge.lm.identity import module_hash, weights_hash
from slmforge.lm.types import LMError, Request, Result


# ------------------------------------------------------------------------------------------ guided decoding
class Guided:
    """JSON-schema constrained decoding with outlines' logits processor inside transformers' generate."""

    def __init__(self, model, tokenizer, cache_size: int = 32):
        import outlines
        from outlines.backends.outlines_core import OutlinesCoreBackend

        self.backend = OutlinesCoreBackend(outlines.from_transformers(model, tokenizer))  # vocabulary index, built once
        self.cache: OrderedDict[str, object] = OrderedDict()  # schema -> compiled processor (compiling costs ~0.1-1 s)
        self.cache_size = cache_size
        self.lock = threading.Lock()

    def compile(self, schema: dict):
        key = json.dumps(schema, sort_keys=True)
        with self.lock:
            proc = self.cache.pop(key, None)
        if proc is None:
            try:
                proc = self.backend.get_json_schema_logits_processor(key)
            except Exception as err:  # outlines raises various types for schemas it cannot compile
                raise LMError(400, f"response_format: this JSON schema cannot be enforced: {err}", "response_format") from None
        with self.lock:
            self.cache[key] = proc
            while len(self.cache) > self.cache_size:
                self.cache.popitem(last=False)
        return proc

    def processor(self, schema: dict):
        proc = self.compile(schema)
        proc.reset()  # per-generation state; schema requests run one at a time on the model thread, so one instance is safe
        return proc


# ------------------------------------------------------------------------------------------ the backend
class TransformersLM(LM):
    def __init__(self, model, tokenizer, name: str, *, path: str | None = None, batch_hint: int = 8,
                 max_batch: int = 32, max_queue: int = 64):
        self.model, self.tok, self.name = model.eval(), tokenizer, name
        self.path = path or getattr(model, "name_or_path", None) or None
        self.batch_hint = batch_hint
        self.max_context = int(getattr(model.config, "max_position_embeddings", 4096) or 4096)
        gen_eos = model.generation_config.eos_token_id
        eos = gen_eos if gen_eos is not None else (tokenizer.eos_token_id if tokenizer is not None else model.config.eos_token_id)
        self.eos = set(eos if isinstance(eos, list) else [eos]) - {None}
        pad = tokenizer.pad_token_id if tokenizer is not None else None
        self.pad_id = pad if pad is not None else next(iter(self.eos))
        self._guided: Guided | None = None
        self._guided_lock = threading.Lock()
        self._identity: dict | None = None
        self.scheduler = BatchScheduler(self, max_batch=max_batch, max_queue=max_queue)

    @classmethod
    def load(cls, spec: str, *, device: str | None = None, name: str | None = None, **kw) -> "TransformersLM":
        """Model and tokenizer from any slmforge model spec (HF id, folder, .gguf, 'default')."""
        from slmforge.models import load_causal_lm, load_tokenizer, resolve_model

        return cls(load_causal_lm(spec, device=device), load_tokenizer(spec), name or spec, path=resolve_model(spec), **kw)

    def identity(self) -> dict:
        if self._identity is None:
            local = self.path is not None and Path(self.path).exists()
            self._identity = {"backend": "transformers",
                              "weights": weights_hash(self.path) if local else (f"hub:{self.path}" if self.path else module_hash(self.model))}
        return self._identity

    def describe(self) -> str:
        return "transformers in process"

    @property
    def guided(self) -> Guided:
        with self._guided_lock:
            if self._guided is None:
                self._guided = Guided(self.model, self.tok)
            return self._guided

    # -------------------------------------------------------------------------------------- prompts
    def tokenize(self, req: Request) -> list[int]:
        if req.prompt_ids is not None:
            return list(req.prompt_ids)
        if req.messages is not None:
            if not getattr(self.tok, "chat_template", None):
                raise LMError(400, "this model has no chat template: use /v1/completions", "messages")
            return list(self.tok.apply_chat_template(req.messages, add_generation_prompt=True, tokenize=True,
                                                     return_dict=True)["input_ids"])
        return list(self.tok(req.prompt)["input_ids"])

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True) if self.tok is not None else ""

    def finish(self, req: Request, ids: list[int], new: list[int], logprobs: list[float] | None) -> Result:
        """The Result of a generation that produced `new` (cut after its first end-of-generation token)."""
        text, stopped = cut_at_stop(self.decode(new), req.stop)
        ended = bool(new) and new[-1] in self.eos
        reason = "stop" if stopped or ended or len(new) < req.max_tokens else "length"
        return Result(text=text, model=self.name, prompt_tokens=len(ids), completion_tokens=len(new), finish_reason=reason,
                      tokens=[self.decode([t]) for t in new], logprobs=logprobs, token_ids=new)

    # -------------------------------------------------------------------------------------- offline batches
    def generate(self, requests: list[Request]) -> list[Result | LMError]:
        out: list[Any] = [None] * len(requests)
        groups: dict[tuple, list[int]] = {}
        for i, r in enumerate(requests):  # one generate() call needs one set of sampling settings
            groups.setdefault(r.sampling(), []).append(i)
        step = max(1, self.batch_hint)
        for idx in groups.values():
            for start in range(0, len(idx), step):
                part = idx[start: start + step]
                try:
                    results = self.hf_generate([requests[i] for i in part], [self.encode(requests[i]) for i in part])
                except LMError as err:
                    results = [err] * len(part)
                except (RuntimeError, ValueError) as err:
                    results = [LMError(500, f"generation failed: {err}", code="generation_failed")] * len(part)
                for i, res in zip(part, results):
                    out[i] = res
        return out

    def hf_generate(self, reqs: list[Request], prompts: list[list[int]], on_text: Callable[[str], None] | None = None,
                    cancel: threading.Event | None = None) -> list[Result]:
        """One `model.generate` over `reqs` (equal sampling settings; the first one's seed seeds the batch), left-padded.
        `on_text` (one request only) receives text deltas; `cancel` stops the generation."""
        import torch
        from transformers import LogitsProcessorList, StoppingCriteria, StoppingCriteriaList
        from transformers.generation.streamers import BaseStreamer

        req, tok, decode = reqs[0], self.tok, self.decode

        class Cancelled(StoppingCriteria):  # the client went away: stop spending CPU on it
            def __call__(self, input_ids, scores, **kw):
                return torch.full((input_ids.shape[0],), bool(cancel is not None and cancel.is_set()), dtype=torch.bool)

        class Streamer(BaseStreamer):  # incremental decode; holds back an unfinished UTF-8 character
            def __init__(self):
                self.ids, self.sent, self.first = [], 0, True

            def put(self, value):
                if self.first:  # the prompt comes first
                    self.first = False
                    return
                self.ids += value.reshape(-1).tolist()
                text = decode(self.ids)
                if not text.endswith("\ufffd") and len(text) > self.sent:
                    on_text(text[self.sent:])
                    self.sent = len(text)

            def end(self):
                pass

        want_logprobs = any(r.logprobs for r in reqs)
        kwargs: dict[str, Any] = dict(max_new_tokens=req.max_tokens, pad_token_id=self.pad_id, return_dict_in_generate=True,
                                      output_logits=want_logprobs, stopping_criteria=StoppingCriteriaList([Cancelled()]))
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
        width = max(map(len, prompts))
        x = torch.tensor([[self.pad_id] * (width - len(p)) + p for p in prompts], device=self.model.device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=self.model.device)
        with torch.inference_mode():
            out = self.model.generate(input_ids=x, attention_mask=mask, **kwargs)
        results = []
        for row, (r, ids) in enumerate(zip(reqs, prompts)):
            new = out.sequences[row, width:].tolist()
            end = next((i + 1 for i, t in enumerate(new) if t in self.eos), len(new))  # after it: padding of a finished row
            new = new[:end]
            logprobs = None
            if r.logprobs and new:
                # the model's own distribution: raw logits, before sampling warpers and the schema mask
                logits = torch.stack(out.logits[:len(new)])[:, row, :].float()
                logprobs = torch.log_softmax(logits, -1).gather(1, torch.tensor(new, device=logits.device)[:, None])[:, 0].tolist()
            results.append(self.finish(r, ids, new, logprobs if r.logprobs else None))
        return results

    # -------------------------------------------------------------------------------------- serving
    async def validate(self, req: Request) -> None:
        self.encode(req)
        self.scheduler.check_capacity()
        if req.schema is not None:
            await asyncio.to_thread(self.guided.compile, req.schema)

    async def complete(self, req: Request) -> Result:
        ids = self.encode(req)
        return await self.scheduler.submit(req, ids)

    def stream(self, req: Request) -> AsyncIterator[str | Result]:
        # the stream itself is returned (not re-yielded), so closing it on a client disconnect cancels the row at once
        ids = self.encode(req)
        return stream_from_thread(lambda on_text, cancel: self.scheduler.submit(req, ids, on_text, cancel), req.stop)

    def answer(self, req: Request) -> Result:
        """One request, synchronously, through the offline path (callers without an event loop)."""
        out = self.generate([req])[0]
        if isinstance(out, LMError):
            raise out
        return out


# ------------------------------------------------------------------------------------------ continuous batching
@dataclass
class _Job:
    req: Request
    ids: list[int]
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop
    on_text: Callable[[str], None] | None
    cancel: threading.Event
    new: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    sent: int = 0
    generator: Any = None
    done: bool = False

    @property
    def solo(self) -> bool:
        return self.req.schema is not None

    def resolve(self, result: Result | None = None, error: BaseException | None = None) -> None:
        def settle():
            if not self.future.done():
                self.future.set_exception(error) if error is not None else self.future.set_result(result)
        self.done = True
        self.loop.call_soon_threadsafe(settle)


class BatchScheduler:
    """Runs every serving request of one TransformersLM on one thread, decoding the running ones as one batch."""

    def __init__(self, lm: TransformersLM, max_batch: int = 32, max_queue: int = 64):
        self.lm, self.max_batch, self.max_queue = lm, max(1, max_batch), max(1, max_queue)
        self.waiting: deque[_Job] = deque()
        self.cv = threading.Condition()
        self.thread: threading.Thread | None = None
        self.active: list[_Job] = []
        self.cache = self.mask = self.last = self.pos = None
        import inspect

        params = inspect.signature(lm.model.forward).parameters  # transformers 5.2x renames past_key_values to cache
        self.cache_kw = "cache" if "cache" in params else "past_key_values"
        self.steps = 0  # decode steps run (a test reads it to see that requests shared steps)
        self.peak_batch = 0

    def submit(self, req: Request, ids: list[int], on_text=None, cancel: threading.Event | None = None) -> asyncio.Future:
        loop = asyncio.get_running_loop()
        job = _Job(req, ids, loop.create_future(), loop, on_text, cancel or threading.Event())
        with self.cv:
            if len(self.waiting) >= self.max_queue:
                raise self._full()
            self.waiting.append(job)
            if self.thread is None:
                self.thread = threading.Thread(target=self._run, name="slmforge-decode", daemon=True)
                self.thread.start()
            self.cv.notify()
        return job.future

    # ---------------------------------------------------------------------------------- the loop
    def _run(self) -> None:
        while True:
            with self.cv:
                while not self.waiting and not self.active:
                    self.cv.wait()
                admit: list[_Job] = []
                solo: _Job | None = None
                while self.waiting and len(self.active) + len(admit) < self.max_batch:
                    if self.waiting[0].solo:
                        if not self.active and not admit:
                            solo = self.waiting.popleft()
                        break  # a schema request waits for the running batch to finish, then runs alone
                    admit.append(self.waiting.popleft())
            try:
                if solo is not None:
                    self._run_solo(solo)
                    continue
                admit = [j for j in admit if not self._gone(j)]
                if admit:
                    self._prefill(admit)
                if self.active:
                    self._step()
            except Exception as err:  # noqa: BLE001 -- a failed step fails its requests, never the server
                error = err if isinstance(err, LMError) else LMError(500, f"generation failed: {type(err).__name__}: {err}",
                                                                     code="generation_failed")
                for job in self.active + admit + ([solo] if solo else []):
                    if not job.done:
                        job.resolve(error=error)
                self.active, self.cache = [], None

    def _gone(self, job: _Job) -> bool:
        if job.cancel.is_set() or job.future.cancelled():
            job.resolve(self.lm.finish(job.req, job.ids, [], []))
            return True
        return False

    def check_capacity(self) -> None:
        """The 503 a request would get now (checked before a stream starts, so it can still be an HTTP status)."""
        with self.cv:
            if len(self.waiting) >= self.max_queue:
                raise self._full()

    def _full(self) -> LMError:
        return LMError(503, f"the server is busy: {len(self.waiting)} requests wait and {len(self.active)} run "
                            f"(serve.max_queue {self.max_queue}); retry shortly", code="queue_full", retry_after=1)

    def _run_solo(self, job: _Job) -> None:
        if self._gone(job):
            return
        try:
            job.resolve(self.lm.hf_generate([job.req], [job.ids], job.on_text, job.cancel)[0])
        except LMError as err:
            job.resolve(error=err)

    def _sample(self, job: _Job, logits, logprobs) -> int:
        """The next token of one row: greedy, or sampled with the request's temperature and top_p (its own generator).
        `logprobs` is the model's own distribution (reported, as the offline path reports it)."""
        import torch

        req = job.req
        if req.temperature <= 0:
            token = int(torch.argmax(logits))
        else:
            if job.generator is None and req.seed is not None:
                job.generator = torch.Generator(device=logits.device).manual_seed(req.seed)
            probs = torch.softmax(logits / req.temperature, -1)
            if req.top_p < 1:
                sorted_p, order = torch.sort(probs, descending=True)
                keep = torch.cumsum(sorted_p, -1) - sorted_p < req.top_p  # the smallest set whose mass reaches top_p
                probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_p[keep])
            token = int(torch.multinomial(probs, 1, generator=job.generator))
        job.new.append(token)
        job.logprobs.append(float(logprobs[token]))
        return token

    def _after_token(self, job: _Job) -> bool:
        """Stream the new text; True when the job is finished (end of generation, stop string, max_tokens, cancelled)."""
        if job.cancel.is_set() or job.future.cancelled():  # the client went away: its row leaves the batch (nobody reads this partial result)
            job.resolve(self.lm.finish(job.req, job.ids, job.new, job.logprobs))
            return True
        ended = job.new[-1] in self.lm.eos
        text = self.lm.decode(job.new)
        stopped = bool(job.req.stop) and cut_at_stop(text, job.req.stop)[1]
        if job.on_text is not None and not text.endswith("\ufffd") and len(text) > job.sent and not stopped:
            job.on_text(text[job.sent:])
            job.sent = len(text)
        if ended or stopped or len(job.new) >= job.req.max_tokens:
            job.resolve(self.lm.finish(job.req, job.ids, job.new, job.logprobs))
            return True
        return False

    def _prefill(self, jobs: list[_Job]) -> None:
        """Run the prompts of newly admitted jobs (left-padded, one forward), sample their first tokens, join the batch."""
        import torch
        from transformers import DynamicCache

        model, dev = self.lm.model, self.lm.model.device
        width = max(len(j.ids) for j in jobs)
        x = torch.tensor([[self.lm.pad_id] * (width - len(j.ids)) + j.ids for j in jobs], device=dev)
        mask = torch.tensor([[0] * (width - len(j.ids)) + [1] * len(j.ids) for j in jobs], device=dev)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)  # as generate() derives positions from a left-padded mask
        cache = DynamicCache()
        with torch.inference_mode():
            out = model(input_ids=x, attention_mask=mask, position_ids=pos, use_cache=True, logits_to_keep=1,
                        **{self.cache_kw: cache})
        logits = out.logits[:, -1, :].float()
        logprobs = torch.log_softmax(logits, -1)
        keep, tokens = [], []
        for row, job in enumerate(jobs):
            token = self._sample(job, logits[row], logprobs[row])
            if not self._after_token(job):
                keep.append(row)
                tokens.append(token)
        if not keep:
            return
        if len(keep) < len(jobs):
            cache.batch_select_indices(torch.tensor(keep, device=dev))
            mask = mask[keep]
        jobs = [jobs[r] for r in keep]
        last = torch.tensor(tokens, device=dev)
        npos = mask.sum(-1)
        if not self.active:
            self.active, self.cache, self.mask, self.last, self.pos = jobs, cache, mask, last, npos
        else:
            self._merge(jobs, cache, mask, last, npos)
        self.peak_batch = max(self.peak_batch, len(self.active))

    def _merge(self, jobs, cache, mask, last, pos) -> None:
        """Append rows to the running batch: both caches left-padded to one length, then stacked."""
        import torch
        import torch.nn.functional as F

        t_old, t_new = self.mask.shape[1], mask.shape[1]
        width = max(t_old, t_new)
        for old_layer, new_layer in zip(self.cache.layers, cache.layers):
            for attr in ("keys", "values"):
                a, b = getattr(old_layer, attr), getattr(new_layer, attr)
                a = F.pad(a, (0, 0, width - t_old, 0)) if width > t_old else a
                b = F.pad(b, (0, 0, width - t_new, 0)) if width > t_new else b
                setattr(old_layer, attr, torch.cat([a, b], 0))
        self.mask = torch.cat([F.pad(self.mask, (width - t_old, 0)), F.pad(mask, (width - t_new, 0))], 0)
        self.last = torch.cat([self.last, last])
        self.pos = torch.cat([self.pos, pos])
        self.active = self.active + jobs

    def _step(self) -> None:
        """One decode step for every running row; finished rows leave the batch (and padding nobody needs is cut)."""
        import torch

        model = self.lm.model
        mask = torch.cat([self.mask, torch.ones_like(self.mask[:, :1])], 1)
        with torch.inference_mode():
            out = model(input_ids=self.last[:, None], attention_mask=mask, position_ids=self.pos[:, None], use_cache=True,
                        **{self.cache_kw: self.cache})
        self.steps += 1
        logits = out.logits[:, -1, :].float()
        logprobs = torch.log_softmax(logits, -1)
        keep, tokens = [], []
        for row, job in enumerate(self.active):
            token = self._sample(job, logits[row], logprobs[row])
            if not self._after_token(job):
                keep.append(row)
                tokens.append(token)
        self.mask, self.pos = mask, self.pos + 1
        if not keep:
            self.active, self.cache = [], None
            return
        dev = mask.device
        if len(keep) < len(self.active):
            self.cache.batch_select_indices(torch.tensor(keep, device=dev))
            self.mask, self.pos = self.mask[keep], self.pos[keep]
            self.active = [self.active[r] for r in keep]
            first = int(self.mask.any(0).nonzero()[0])  # leading columns that are padding in every remaining row
            if first > 0:
                for layer in self.cache.layers:
                    layer.keys, layer.values = layer.keys[:, :, first:], layer.values[:, :, first:]
                self.mask = self.mask[:, first:]
        self.last = torch.tensor(tokens, device=dev)
