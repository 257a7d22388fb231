"""A model's identity for cache keys: the content of its weights (and of the files that shape its answers), hashed
once per (path, inode, size, mtime) by `slmforge.run.sha256_file` -- never the path string, so new weights at the
same path are a new identity and a moved copy is the same one."""

from __future__ import annotations

import hashlib
from pathlib import Path

from slmforge.run import hash_obj, sha256_file

# in a model folder: the weights plus what changes the text (tokenizer, chat template, generation defaults)
SHAPES_OUTPUT = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                 "chat_template.jinja", "tokenizer.model")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt", ".pth")


def weights_hash(path: str | Path) -> str:
    """sha256 of a weight file, or of a model folder's weight and tokenizer files; `hub:<id>` for a hub id not on disk."""
    p = Path(path).expanduser()
    if p.is_file():
        return sha256_file(p)
    if p.is_dir():
        files = sorted(f for f in p.iterdir() if f.is_file() and (f.suffix in WEIGHT_SUFFIXES or f.name in SHAPES_OUTPUT))
        if not any(f.suffix in WEIGHT_SUFFIXES for f in files):
            raise FileNotFoundError(f"{p}: no weight files (*.safetensors, *.bin, *.gguf) to identify the model by")
        return hash_obj([(f.name, sha256_file(f)) for f in files])
    return f"hub:{path}"


def module_hash(model) -> str:
    """sha256 of an in-memory model's parameters and buffers (for a model that was not loaded from files)."""
    import torch

    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
