"""The teacher: any slmforge.lm backend, chosen by the recipe, asked through a response cache.

A generator's request is a JSON-able dict {"messages": [...], "max_tokens": int, "temperature": float, "seed": int};
`teacher_request` turns it into an `slmforge.lm.Request`. The pipeline asks through `slmforge.lm.CachingLM`, so a
resumed run never pays for a request twice and a failed request (never cached) is retried on the next run.

    openai        any OpenAI-compatible server (vLLM, llama.cpp server, Ollama, OpenAI): bounded concurrency, timeouts,
                  retries with jittered backoff (slmforge.lm.http)
    transformers  in process, batched generation (the default: the base model teaches itself)
    llamacpp      llama-cpp-python on a GGUF file, when installed (never required)
"""

from __future__ import annotations

import os
from pathlib import Path

from slmforge.lm import LM, LMError, Request
from slmforge.recipe import GenerateConfig, TeacherConfig

TeacherError = LMError  # a request that failed for good (after retries): returned in place of the answer, never cached
TEACHER_TOP_P = 0.95  # nucleus sampling when a teacher samples (temperature > 0)


def teacher_request(r: dict) -> Request:
    temperature = r.get("temperature", 0.0)
    return Request(messages=r["messages"], max_tokens=r.get("max_tokens", 128), temperature=temperature,
                   top_p=TEACHER_TOP_P if temperature > 0 else 1.0, seed=r.get("seed", 0), logprobs=False)


def make_teacher(cfg: GenerateConfig, base_model: str) -> LM | None:
    """The teacher the recipe asks for; None for backend 'none' (extractive items only)."""
    t: TeacherConfig = cfg.teacher
    model = base_model if t.model == "base" else t.model
    if t.backend == "none":
        return None
    if t.backend == "transformers":
        from slmforge.lm.hf import TransformersLM

        name = "transformers:SmolLM2-135M-Instruct" if model == "default" else f"transformers:{model}"
        return TransformersLM.load(model, name=name, batch_hint=t.batch_size)
    if t.backend == "llamacpp":
        from slmforge.models import default_gguf

        gguf = default_gguf() if model == "default" else Path(model)
        if gguf.suffix != ".gguf":
            raise ValueError(f"generate.teacher.model: llamacpp needs a .gguf file, got {model!r}")
        try:
            from slmforge.lm.llamacpp import LlamaCppLM
        except ImportError:
            raise RuntimeError("teacher.backend=llamacpp needs llama-cpp-python: pip install 'slmforge[llamacpp]'") from None
        return LlamaCppLM(gguf, name=f"llamacpp:{gguf.stem}")
    base_url = t.base_url or os.environ.get("SLMFORGE_TEACHER_BASE_URL") or os.environ.get("OPENAI_BASE_URL")
    if not base_url:
        raise ValueError("generate.teacher.base_url is not set (or set SLMFORGE_TEACHER_BASE_URL), e.g. http://127.0.0.1:8000/v1")
    if t.model == "base":
        model = os.environ.get("SLMFORGE_TEACHER_MODEL", base_model)
    key = t.api_key.get_secret_value() if t.api_key else os.environ.get(t.api_key_env)
    from slmforge.lm.http import OpenAILM

    return OpenAILM(base_url, model, key, concurrency=t.concurrency, timeout_s=t.timeout_s, max_retries=t.max_retries,
                    backoff_s=t.backoff_s, name=f"openai:{model}")
