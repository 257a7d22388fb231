"""Serving a GGUF with llama.cpp in process: which file `serve` picks (always runs), and, where the compiled
llama-cpp-python is installed (extra `llamacpp`; .ci/run does not build it: 12+ minutes on 2 cores), the engine
behind a real uvicorn server on the packaged SmolLM2 GGUF: chat, streaming, stop strings, JSON schema, log-probs,
context errors, and the llama.cpp teacher."""

from __future__ import annotations

import importlib.util
import json

import jsonschema
import openai
import pytest

from slmforge.models import default_gguf
from slmforge.recipe import GenerateConfig, ServeConfig, build_recipe
from slmforge.run import RunDir, atomic_write_json
from slmforge.serve import app as serve_app
from slmforge.serve.app import ServeError, create_app, serving_gguf
from test_serve import HELLO, running

HAVE_LLAMA_CPP = importlib.util.find_spec("llama_cpp") is not None
needs_llama_cpp = pytest.mark.skipif(not HAVE_LLAMA_CPP, reason="llama-cpp-python not installed (pip install 'slmforge[llamacpp]')")


def _recipe(tmp_path, **serve):
    docs = tmp_path / "docs"
    docs.mkdir(exist_ok=True)
    return build_recipe({"name": "spec", "documents": str(docs), "run_dir": str(tmp_path / "runs"), "serve": serve})


def test_serve_picks_the_exported_gguf_of_the_model_it_serves(tmp_path):
    recipe = _recipe(tmp_path)
    assert serving_gguf(recipe) == default_gguf()  # nothing trained yet: the packaged base model's GGUF
    run = RunDir(recipe.run_path)
    export = run.stage_dir("export")
    (export / "model").mkdir(parents=True)
    (export / "model" / "config.json").write_text("{}")
    atomic_write_json(export / "manifest.json", {"stage": "export", "outputs": {}, "counts": {}})
    assert serving_gguf(recipe) is None  # exported without GGUF: transformers serves export/model
    (export / "gguf").mkdir()
    for t in ("f16", "Q4_K_M", "q8_0"):
        (export / "gguf" / f"spec-{t}.gguf").write_bytes(b"GGUF")
    assert serving_gguf(recipe).name == "spec-q8_0.gguf"  # serve.gguf_type's default
    assert serving_gguf(_recipe(tmp_path, gguf_type="Q4_K_M")).name == "spec-Q4_K_M.gguf"
    (export / "gguf" / "spec-q8_0.gguf").unlink()
    assert serving_gguf(recipe).name == "spec-Q4_K_M.gguf"  # the wanted type is missing: the next in preference order
    assert serving_gguf(_recipe(tmp_path, model=str(export / "model"))).name == "spec-Q4_K_M.gguf"


def test_llamacpp_engine_without_a_gguf_or_the_package_is_a_clear_error(tmp_path, monkeypatch):
    folder = tmp_path / "hf"
    folder.mkdir()
    with pytest.raises(ServeError, match="is not a GGUF file"):
        serve_app.make_engine(_recipe(tmp_path, engine="llamacpp", model=str(folder)), "spec")
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "llama_cpp" else real_find_spec(n, *a))
    with pytest.raises(ServeError, match="llama-cpp-python is not installed"):
        serve_app.make_engine(_recipe(tmp_path, engine="llamacpp", model="default"), "spec")


# ------------------------------------------------------------------------------------------ with llama.cpp
@pytest.fixture(scope="module")
def llama_server():
    from slmforge.lm.llamacpp import LlamaCppLM

    engine = LlamaCppLM(default_gguf(), "smollm2-llamacpp", n_ctx=512)
    with running(create_app(engine, ServeConfig(max_tokens=1024, default_max_tokens=32))) as url:
        yield openai.OpenAI(base_url=url, api_key="unused", max_retries=0), engine


@needs_llama_cpp
def test_llamacpp_chat_is_greedy_streams_the_same_text_and_reports_logprobs(llama_server):
    client, _ = llama_server
    first = client.chat.completions.create(model="x", messages=HELLO, max_tokens=24, logprobs=True)
    again = client.chat.completions.create(model="x", messages=HELLO, max_tokens=24)
    text = first.choices[0].message.content
    assert text.strip() and text == again.choices[0].message.content  # temperature 0 = greedy = deterministic
    logprobs = [c.logprob for c in first.choices[0].logprobs.content]
    assert len(logprobs) == first.usage.completion_tokens and all(lp <= 0 for lp in logprobs)
    assert first.usage.completion_tokens == 24 or first.choices[0].finish_reason == "stop"
    deltas = [c.choices[0].delta.content for c in client.chat.completions.create(model="x", messages=HELLO, max_tokens=24,
                                                                                   stream=True) if c.choices]
    assert len([d for d in deltas if d]) > 3 and "".join(d or "" for d in deltas) == text  # token by token, same text


@needs_llama_cpp
def test_llamacpp_stop_strings_and_context_errors(llama_server):
    client, _ = llama_server
    full = client.completions.create(model="x", prompt="SELECT * FROM users WHERE", max_tokens=16).choices[0].text
    word = full.split()[1] if len(full.split()) > 1 else full.split()[0]
    cut = client.completions.create(model="x", prompt="SELECT * FROM users WHERE", max_tokens=16, stop=[word])
    assert cut.choices[0].text == full[: full.index(word)] and cut.choices[0].finish_reason == "stop"
    with pytest.raises(openai.BadRequestError, match="exceeds the served context of 512"):
        client.completions.create(model="x", prompt="word " * 400, max_tokens=200)


@needs_llama_cpp
def test_llamacpp_json_schema_output_is_valid(llama_server):
    client, _ = llama_server
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 40},
                                               "supports_indexes": {"type": "boolean"}},
              "required": ["name", "supports_indexes"], "additionalProperties": False}
    answer = client.chat.completions.create(
        model="x", max_tokens=60, messages=[{"role": "user", "content": "Describe PostgreSQL as JSON."}],
        response_format={"type": "json_schema", "json_schema": {"name": "db", "schema": schema}})
    jsonschema.validate(json.loads(answer.choices[0].message.content), schema)


@needs_llama_cpp
def test_llamacpp_teacher_answers_chat_requests():
    from slmforge.generate import make_teacher, teacher_request

    teacher = make_teacher(GenerateConfig(teacher={"backend": "llamacpp", "model": "default"}), "default")
    reqs = [teacher_request(r) for r in ({"messages": HELLO, "max_tokens": 16},
                                         {"messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 8})]
    out = [r.text for r in teacher.generate(reqs)]
    assert len(out) == 2 and all(isinstance(o, str) and o for o in out)
    assert [r.text for r in teacher.generate(reqs[:1])] == out[:1]  # greedy: reproducible
