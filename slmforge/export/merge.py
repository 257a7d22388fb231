"""Which model to export, and writing it as a plain HF folder (LoRA adapters merged, safetensors, tokenizer, chat template)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from slmforge.models import resolve_model
from slmforge.artifacts import TRAIN_STAGES, adapter
from slmforge.run import RunDir, hash_obj, sha256_file

WEIGHT_PATTERNS = ("*.safetensors", "pytorch_model*.bin")


@dataclass
class Source:
    """The model to export: a full model folder / HF id, optionally with a peft adapter to merge onto it."""

    label: str  # "sft", "dpo", "base", or the folder given in the recipe
    model: str  # what from_pretrained loads (for an adapter: its base model)
    adapter: Path | None = None

    def fingerprint(self) -> str:
        """Content hash of the weights (a changed model reruns the export)."""
        parts = {"model": self.model, "adapter": str(self.adapter)}
        for name, folder in (("model", Path(self.model)), ("adapter", self.adapter)):
            if folder is not None and folder.is_dir():
                parts[name] = {p.name: sha256_file(p) for p in sorted(folder.iterdir()) if p.is_file()}
        return hash_obj(parts)


def _has_weights(folder: Path) -> bool:
    return any(any(folder.glob(p)) for p in WEIGHT_PATTERNS)


def _adapter_source(label: str, adapter: Path) -> Source:
    config = json.loads((adapter / "adapter_config.json").read_text())
    base = config.get("base_model_name_or_path")
    if not base:
        raise ValueError(f"{adapter / 'adapter_config.json'}: no base_model_name_or_path, cannot tell what to merge onto")
    return Source(label, resolve_model(base), adapter)


def resolve_source(spec: str, run: RunDir, base_model: str) -> Source:
    """'auto' = the merge stage's model when it ran (slmforge/merge), else the last trained stage (dpo > sft > dapt), else
    the base model; 'base'; or a model / peft adapter folder."""
    if spec == "auto":
        from slmforge.merge import merged_model

        merged = merged_model(run)
        if merged is not None:
            return Source("merge", str(merged))
        trained = run.trained_models()
        if not trained:
            return Source("base", resolve_model(base_model))
        label, folder = list(trained.items())[-1]
    elif spec == "base":
        return Source("base", resolve_model(base_model))
    else:
        label, folder = spec, Path(spec).expanduser()
        if not folder.is_dir():
            raise FileNotFoundError(f"export.source: {folder} is not a folder")
    if (folder / "adapter_config.json").is_file():
        return _adapter_source(label, folder)
    kept = run.path(adapter(label)) if label in TRAIN_STAGES else None  # a stage that kept only its LoRA adapter
    if not _has_weights(folder) and kept is not None and (kept / "adapter_config.json").is_file():
        return _adapter_source(label, kept)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"export.source: {folder} has neither config.json nor adapter_config.json")
    return Source(label, str(folder))


def load_merged(source: Source, dtype: str = "float32"):
    """(model, tokenizer) on CPU; a LoRA adapter is merged into the weights (peft merge_and_unload)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch_dtype = getattr(torch, dtype)
    model = AutoModelForCausalLM.from_pretrained(source.model, dtype=torch.float32)  # merge in fp32, cast after
    tok_from = source.adapter if source.adapter and (source.adapter / "tokenizer_config.json").is_file() else source.model
    tokenizer = AutoTokenizer.from_pretrained(tok_from)
    if source.adapter is not None:
        try:
            from peft import PeftModel
        except ImportError:
            raise RuntimeError(f"merging the LoRA adapter {source.adapter} needs peft: pip install 'slmforge[export]'") from None

        if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
            model.resize_token_embeddings(len(tokenizer))
        model = PeftModel.from_pretrained(model, str(source.adapter)).merge_and_unload()
    return model.to(torch_dtype).eval(), tokenizer


def save_hf_folder(model, tokenizer, folder: Path) -> list[str]:
    """safetensors + config + generation config + tokenizer (with its chat template). Returns warnings."""
    warnings = []
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    if not getattr(tokenizer, "chat_template", None):
        warnings.append("the tokenizer has no chat template: chat clients will need one")
    return warnings
