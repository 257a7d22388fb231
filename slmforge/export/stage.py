"""Export stage: the final model -> export/ with

    model/        merged safetensors HF folder (tokenizer, chat template) for transformers and vLLM, complete on its own
                  as a hub repo: README.md (model card with the hub's YAML front matter: recipe, data summary, input
                  licences, evaluation table, GGUF check) and the licence files of the inputs
    gguf/         <name>-f16.gguf, -q8_0.gguf (llama.cpp's converter), -Q4_K_M.gguf (its quantizer, when installed)
    Modelfile     for `ollama create`
    verify.json   greedy outputs of the HF folder and of every GGUF on the same prompt tokens

GGUF files are kept in the run's cache keyed by the model's content, so a rerun after a crash converts only
what is missing.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from slmforge.console import console, track
from slmforge.export import card, gguf
from slmforge.export.merge import load_merged, resolve_source, save_hf_folder
from slmforge.artifacts import (EXPORT, EXPORTED_MODEL, GGUF, MERGED_MODEL, MODEL_CARD, MODELFILE, TABLE, TRAIN_STAGES, VERIFY,
                                gguf_file, trained_model)
from slmforge.run import StageContext, Stage, atomic_write_json, atomic_write_text, hash_obj, sha256_file


class ExportStage(Stage):
    name = EXPORT
    uses = (TABLE,) + tuple(trained_model(s) for s in TRAIN_STAGES) + (MERGED_MODEL,)  # the model card pastes the eval table
    makes = (EXPORTED_MODEL, GGUF, MODELFILE, MODEL_CARD, VERIFY)

    def external_inputs(self, recipe, run):
        source = resolve_source(recipe.export.source, run, recipe.base_model)
        out = {"model": source.fingerprint()}
        for stage in card.DATA_STAGES:  # the model card summarises every stage's counts
            m = run.manifest(stage)
            if m is not None:
                out[stage] = hash_obj(m.get("outputs", {}))
        lic = card.find_corpus_license(recipe.documents, recipe.export.corpus_license_file)
        if lic is not None:
            out["corpus_license"] = sha256_file(lic)
        return out

    def run(self, ctx: StageContext) -> None:
        recipe, cfg, out = ctx.recipe, ctx.recipe.export, ctx.out
        notes: list[str] = []
        source = resolve_source(cfg.source, ctx.run, recipe.base_model)
        console.print(f"  exporting the {source.label} model" + (" (merging its LoRA adapter)" if source.adapter else ""))
        model, tokenizer = load_merged(source, cfg.dtype)
        model_dir = ctx.path(EXPORTED_MODEL)
        notes += save_hf_folder(model, tokenizer, model_dir)
        model_hash = hash_obj({p.name: sha256_file(p) for p in sorted(model_dir.iterdir()) if p.is_file()})

        # Reference: greedy tokens of the exported folder as transformers reloads it (upcast to fp32 like the GGUF reader).
        from transformers import AutoModelForCausalLM
        import torch

        del model
        reloaded = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        prompts = gguf.chat_inputs(tokenizer, cfg.verify_prompts)
        reference = gguf.greedy(reloaded, prompts, cfg.verify_tokens)
        verify = {"prompts": cfg.verify_prompts, "hf": [tokenizer.decode(r, skip_special_tokens=True) for r in reference],
                  "gguf": {}, "gguf_llama_cpp": {}}
        del reloaded

        report = self._gguf(ctx, model_dir, model_hash, prompts, reference, tokenizer, verify)
        ctx.write_json(VERIFY, verify)

        files = report["files"]
        if files:
            preferred = next((n for n, r in files.items() if r["type"] == cfg.ollama_gguf), next(iter(files)))
            weights = f"./{GGUF.name}/{preferred}"
        else:
            weights = f"./{EXPORTED_MODEL.name}"  # Ollama imports a safetensors folder of a supported architecture directly
        ctx.write_text(MODELFILE, card.modelfile(weights, getattr(tokenizer, "chat_template", None)))

        licences = self._licences(recipe, out, notes)
        manifests = {s: m for s in card.DATA_STAGES if (m := ctx.run.manifest(s)) is not None}
        eval_table = ctx.input(TABLE).read_text(encoding="utf-8") if ctx.run.has(TABLE) else None
        if eval_table is None:
            notes.append("no evaluation table: run `slmforge eval` before exporting to include it")
        readme = card.model_card(recipe=recipe, source_label=source.label, out=out, manifests=manifests,
                                 eval_table=eval_table, gguf_report=report, licences=licences, notes=notes)
        ctx.write_text(MODEL_CARD, readme)
        ctx.counts.update(
            source=source.label, merged_adapter=source.adapter is not None, dtype=cfg.dtype,
            gguf={n: {k: r.get(k) for k in ("type", "mb", "verify", "verify_llama_cpp")} for n, r in files.items()},
            gguf_skipped=report["skipped"], eval_table=eval_table is not None, corpus_license=licences["corpus"],
            notes=notes,
        )

    # -------------------------------------------------------------------------------------- GGUF
    def _gguf(self, ctx, hf_folder: Path, model_hash: str, prompts, reference, tokenizer, verify) -> dict:
        cfg = ctx.recipe.export
        report: dict = {"files": {}, "skipped": []}
        if not cfg.gguf:
            return report
        try:
            converter = gguf.find_converter(cfg.llama_cpp)
        except gguf.ConverterMissing as err:
            report["skipped"].append(f"GGUF skipped: {err}")
            console.print(f"  [yellow]warning:[/yellow] {err}", highlight=False)
            return report
        cache = ctx.run.cache_dir(self.name) / model_hash[:16]
        cache.mkdir(parents=True, exist_ok=True)
        log = ctx.scratch / "gguf.log"
        stem = ctx.recipe.name
        wanted = list(dict.fromkeys(cfg.gguf))
        needs_f16 = any(t in gguf.QUANTIZER_TYPES for t in wanted)
        tool = gguf.quantizer() if needs_f16 else None
        made: dict[str, Path] = {}
        for qtype in track([t for t in wanted if t in gguf.CONVERTER_TYPES] + (["f16"] if needs_f16 and tool and "f16" not in wanted else []),
                           "converting to GGUF"):
            target = cache / gguf_file(stem, qtype)
            made[qtype] = target if target.is_file() else gguf.convert(hf_folder, target, qtype, converter, log)
        for qtype in [t for t in wanted if t in gguf.QUANTIZER_TYPES]:
            if tool is None:
                report["skipped"].append(f"{qtype} skipped: llama.cpp's quantizer is not installed "
                                         "(pip install llama-cpp-python, or put llama-quantize on PATH)")
                continue
            target = cache / gguf_file(stem, qtype)
            made[qtype] = target if target.is_file() else gguf.quantize(made["f16"], target, qtype, tool)
        for qtype in track([t for t in wanted if t in made], "checking GGUF files"):
            dest = ctx.path(GGUF) / made[qtype].name
            try:  # the cache keeps the file so a rerun skips the conversion; a hard link costs no disk
                os.link(made[qtype], dest)
            except OSError:
                shutil.copy2(made[qtype], dest)
            entry = {"type": qtype, "mb": round(dest.stat().st_size / 2**20, 1)}
            n = ctx.recipe.export.verify_tokens
            readers = (("verify", "gguf", "transformers", lambda: gguf.greedy(gguf.load_gguf(dest), prompts, n)),
                       ("verify_llama_cpp", "gguf_llama_cpp", "llama.cpp", lambda: gguf.greedy_llama_cpp(dest, prompts, n)))
            for key, section, reader, run in readers:
                try:
                    outs = run()
                except Exception as err:  # a reader that cannot load a new quant type must not lose the file
                    entry[key] = f"not loadable by {reader}: {type(err).__name__}: {err}"[:300]
                    continue
                if outs is not None:  # None: llama-cpp-python is not installed
                    entry[key] = f"{sum(a == b for a, b in zip(outs, reference))}/{len(reference)}"
                    verify[section][dest.name] = [tokenizer.decode(o, skip_special_tokens=True) for o in outs]
            report["files"][dest.name] = entry
        report["converter"] = gguf.converter_version(converter)
        return report

    def _licences(self, recipe, out: Path, notes: list[str]) -> dict:
        cfg = recipe.export
        lic_file = card.find_corpus_license(recipe.documents, cfg.corpus_license_file)
        corpus = cfg.corpus_license or ("see LICENSE-corpus" if lic_file else "unknown")
        if lic_file is None and not cfg.corpus_license:
            notes.append("the documents' licence is unknown: set export.corpus_license (and corpus_license_file)")
        if lic_file is not None:
            shutil.copy2(lic_file, out / EXPORTED_MODEL.name / "LICENSE-corpus")
        base_file = card.find_base_model_license_file(recipe.base_model)
        if base_file is not None:
            shutil.copy2(base_file, out / EXPORTED_MODEL.name / "LICENSE-base-model")
        return {"base_model": card.base_model_license(recipe.base_model, cfg.base_model_license), "corpus": corpus,
                "corpus_file": "LICENSE-corpus" if lic_file else None,
                "base_model_file": "LICENSE-base-model" if base_file else None}

    def summary_rows(self, c: dict) -> list[tuple[str, str]]:
        rows = [("exported model", c["source"] + (" (LoRA merged)" if c["merged_adapter"] else ""))]
        rows += [(f"GGUF {v['type']}", f"{v['mb']} MiB, greedy match {v['verify']}"
                  + (f", in llama.cpp {v['verify_llama_cpp']}" if v.get("verify_llama_cpp") else "")) for v in c["gguf"].values()]
        rows += [("GGUF skipped", s[:80]) for s in c["gguf_skipped"]]
        rows.append(("model card eval table", "yes" if c["eval_table"] else "no (run eval first)"))
        return rows
