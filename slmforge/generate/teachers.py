"""Teachers behind one small interface: `complete(requests) -> [text | TeacherError]`, in request order.

A request is a JSON-able dict {"messages": [...], "max_tokens": int, "temperature": float, "seed": int}.
`generate_cached` puts a response cache (one file per request hash) in front of any teacher, so a resumed run
never pays for a request twice; failures are not cached, so a rerun retries exactly those.

    OpenAITeacher        any OpenAI-compatible server (vLLM, llama.cpp server, Ollama, OpenAI): async httpx,
                         bounded concurrency, timeouts, retries with exponential backoff
    TransformersTeacher  in process, batched generation (the default: the base model teaches itself)
    LlamaCppTeacher      llama-cpp-python on a GGUF file, when installed (never required)
"""

from __future__ import annotations

import asyncio
import json
import os
import random
from pathlib import Path
from typing import Any

from slmforge.console import track
from slmforge.recipe import GenerateConfig, TeacherConfig
from slmforge.run import atomic_write_json, hash_obj


class TeacherError(Exception):
    """A request that failed for good (after retries). Returned in place of the text, never cached."""


class Teacher:
    name: str = "teacher"  # recorded as the `origin` of every item it writes
    batch_hint: int = 8  # requests handed to `complete` at once (and cached after each such batch)

    @property
    def endpoint(self) -> str:
        """Where the teacher's answers come from (a URL, a model folder, a GGUF file), for error messages."""
        return self.name

    def identity(self) -> dict:
        """What makes two teachers give the same answer to the same request (the response cache key). No secrets."""
        raise NotImplementedError

    def complete(self, requests: list[dict]) -> list[str | TeacherError]:
        raise NotImplementedError


def generate_cached(teacher: Teacher, requests: list[dict], cache_dir: Path, description: str = "teacher") -> list[str | TeacherError]:
    """Answers for `requests` in order: from the cache where present, else from the teacher (cached on success)."""
    cache_dir = Path(cache_dir)
    ident = teacher.identity()
    keys = [hash_obj({"teacher": ident, "request": r}) for r in requests]
    paths = [cache_dir / k[:2] / f"{k}.json" for k in keys]
    out: list[Any] = [None] * len(requests)
    todo: dict[str, list[int]] = {}  # equal requests are sent once
    for i, p in enumerate(paths):
        if p.is_file():
            try:
                out[i] = json.loads(p.read_text(encoding="utf-8"))["text"]
                continue
            except (ValueError, KeyError):
                pass  # a damaged cache file is recomputed
        todo.setdefault(keys[i], []).append(i)
    pending = list(todo.values())
    step = max(1, teacher.batch_hint)
    batches = [pending[i : i + step] for i in range(0, len(pending), step)]
    for batch in track(batches, f"{description} ({len(pending)} requests, {len(requests) - sum(map(len, pending))} cached)"):
        answers = teacher.complete([requests[group[0]] for group in batch])
        for group, ans in zip(batch, answers):
            if isinstance(ans, str):
                atomic_write_json(paths[group[0]], {"text": ans, "teacher": teacher.name})
            for i in group:
                out[i] = ans
    return out


# ---------------------------------------------------------------------------------------------- OpenAI HTTP
class _Retryable(Exception):
    pass


class OpenAITeacher(Teacher):
    def __init__(self, base_url: str, model: str, api_key: str | None = None, *, concurrency: int = 4,
                 timeout_s: float = 60.0, max_retries: int = 3, backoff_s: float = 0.5):
        self.base_url = base_url.rstrip("/")
        self.model = model
        self._key = api_key  # kept out of identity(), names, logs and repr
        self.concurrency, self.timeout_s, self.max_retries, self.backoff_s = concurrency, timeout_s, max_retries, backoff_s
        self.name = f"openai:{model}"
        self.batch_hint = concurrency * 4

    def __repr__(self) -> str:
        return f"OpenAITeacher(base_url={self.base_url!r}, model={self.model!r})"

    @property
    def endpoint(self) -> str:
        return f"{self.base_url}/chat/completions (model {self.model})"

    def identity(self) -> dict:
        return {"backend": "openai", "base_url": self.base_url, "model": self.model}

    def complete(self, requests: list[dict]) -> list[str | TeacherError]:
        return asyncio.run(self._complete_all(requests))

    async def _complete_all(self, requests: list[dict]) -> list[str | TeacherError]:
        import httpx

        headers = {"Authorization": f"Bearer {self._key}"} if self._key else {}
        limits = httpx.Limits(max_connections=self.concurrency)
        sem = asyncio.Semaphore(self.concurrency)
        async with httpx.AsyncClient(base_url=self.base_url, headers=headers, timeout=self.timeout_s, limits=limits) as client:
            return await asyncio.gather(*(self._one(client, sem, r) for r in requests))

    async def _one(self, client, sem: asyncio.Semaphore, req: dict) -> str | TeacherError:
        import httpx

        body = {"model": self.model, "messages": req["messages"], "max_tokens": req.get("max_tokens", 128),
                "temperature": req.get("temperature", 0.0), "seed": req.get("seed", 0)}
        last = "no attempt"
        for attempt in range(self.max_retries + 1):
            try:
                async with sem:
                    r = await client.post("/chat/completions", json=body)
                if r.status_code in (408, 409, 429) or r.status_code >= 500:
                    raise _Retryable(f"HTTP {r.status_code}")
                if r.status_code >= 400:
                    return TeacherError(f"HTTP {r.status_code}: {r.text[:200]}")  # a client error will not heal
                text = r.json()["choices"][0]["message"]["content"]
                if not isinstance(text, str):
                    raise _Retryable("malformed reply: content is not text")
                return text
            except httpx.TimeoutException:
                last = f"timeout after {self.timeout_s}s"
            except (httpx.TransportError, _Retryable) as err:
                last = str(err) or type(err).__name__
            except (ValueError, KeyError, IndexError, TypeError) as err:
                last = f"malformed reply ({type(err).__name__})"
            if attempt < self.max_retries:
                await asyncio.sleep(self.backoff_s * 2**attempt * (0.5 + random.random()))  # jittered backoff
        return TeacherError(f"{last} (after {self.max_retries + 1} attempts)")


# ---------------------------------------------------------------------------------------------- transformers
class TransformersTeacher(Teacher):
    def __init__(self, model: str, *, batch_size: int = 8, device: str | None = None):
        from slmforge.models import load_causal_lm, load_tokenizer, resolve_model

        self.spec = model
        self.path = resolve_model(model)
        self.tok = load_tokenizer(model)
        self.tok.padding_side = "left"  # decoder-only batching: pad on the left so every row ends at its prompt
        self.model = load_causal_lm(model, device=device).eval()
        self.batch_hint = batch_size
        self.name = f"transformers:{Path(self.path).name if model == 'default' else model}"
        if model == "default":
            self.name = "transformers:SmolLM2-135M-Instruct"

    def identity(self) -> dict:
        weights = sorted(Path(self.path).glob("*.safetensors")) if Path(self.path).is_dir() else []
        stamp = [(p.name, p.stat().st_size, int(p.stat().st_mtime)) for p in weights]
        return {"backend": "transformers", "model": self.path, "weights": stamp}

    def complete(self, requests: list[dict]) -> list[str | TeacherError]:
        out: list[Any] = [None] * len(requests)
        groups: dict[tuple, list[int]] = {}
        for i, r in enumerate(requests):  # one generate() call needs one max_tokens/temperature
            groups.setdefault((r.get("max_tokens", 128), r.get("temperature", 0.0)), []).append(i)
        for (max_tokens, temperature), idx in groups.items():
            try:
                texts = self._generate([requests[i] for i in idx], max_tokens, temperature)
            except (RuntimeError, ValueError) as err:
                texts = [TeacherError(f"generation failed: {err}")] * len(idx)
            for i, t in zip(idx, texts):
                out[i] = t
        return out

    def _generate(self, requests: list[dict], max_tokens: int, temperature: float) -> list[str]:
        import torch

        prompts = [self.tok.apply_chat_template(r["messages"], add_generation_prompt=True, tokenize=False) for r in requests]
        enc = self.tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(self.model.device)
        kwargs: dict[str, Any] = {"max_new_tokens": max_tokens, "pad_token_id": self.tok.pad_token_id}
        if temperature > 0:
            torch.manual_seed(requests[0].get("seed", 0))
            kwargs.update(do_sample=True, temperature=temperature, top_p=0.95)
        else:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        with torch.inference_mode():
            gen = self.model.generate(**enc, **kwargs)
        return [t.strip() for t in self.tok.batch_decode(gen[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)]


# ---------------------------------------------------------------------------------------------- llama.cpp
class LlamaCppTeacher(Teacher):
    """A GGUF run by llama.cpp in process, through the same engine `slmforge serve` uses (chat template from the GGUF,
    OpenAI sampling semantics, all cores)."""

    batch_hint = 1

    def __init__(self, gguf: Path, n_ctx: int = 4096):
        try:
            from slmforge.serve.engines import LlamaCppEngine

            self.engine = LlamaCppEngine(gguf, name=f"llamacpp:{Path(gguf).stem}", n_ctx=n_ctx)
        except ImportError:
            raise RuntimeError("teacher.backend=llamacpp needs llama-cpp-python: pip install 'slmforge[llamacpp]'") from None
        self.gguf, self.name = Path(gguf), self.engine.name

    def identity(self) -> dict:
        st = self.gguf.stat()
        return {"backend": "llamacpp", "model": str(self.gguf), "size": st.st_size, "mtime": int(st.st_mtime)}

    def complete(self, requests: list[dict]) -> list[str | TeacherError]:
        from slmforge.serve.protocol import APIError, GenRequest

        out: list[str | TeacherError] = []
        for r in requests:
            req = GenRequest(messages=r["messages"], max_tokens=r.get("max_tokens", 128),
                             temperature=r.get("temperature", 0.0), seed=r.get("seed", 0))
            try:
                out.append(self.engine.answer(req).text.strip())
            except (APIError, RuntimeError, ValueError) as err:
                out.append(TeacherError(f"llama.cpp failed: {getattr(err, 'message', err)}"))
        return out


# ---------------------------------------------------------------------------------------------- factory
def make_teacher(cfg: GenerateConfig, base_model: str) -> Teacher | None:
    """The teacher the recipe asks for; None for backend 'none' (extractive items only)."""
    t: TeacherConfig = cfg.teacher
    model = base_model if t.model == "base" else t.model
    if t.backend == "none":
        return None
    if t.backend == "transformers":
        return TransformersTeacher(model, batch_size=t.batch_size)
    if t.backend == "llamacpp":
        from slmforge.models import default_gguf

        gguf = default_gguf() if model == "default" else Path(model)
        if gguf.suffix != ".gguf":
            raise ValueError(f"generate.teacher.model: llamacpp needs a .gguf file, got {model!r}")
        return LlamaCppTeacher(gguf)
    base_url = t.base_url or os.environ.get("SLMFORGE_TEACHER_BASE_URL") or os.environ.get("OPENAI_BASE_URL")
    if not base_url:
        raise ValueError("generate.teacher.base_url is not set (or set SLMFORGE_TEACHER_BASE_URL), e.g. http://127.0.0.1:8000/v1")
    if t.model == "base":
        model = os.environ.get("SLMFORGE_TEACHER_MODEL", base_model)
    key = t.api_key.get_secret_value() if t.api_key else os.environ.get(t.api_key_env)
    return OpenAITeacher(base_url, model, key, concurrency=t.concurrency, timeout_s=t.timeout_s,
                         max_retries=t.max_retries, backoff_s=t.backoff_s)
