"""GGUF files made with llama.cpp's own converter, K-quants with its quantizer, and a check that they say the same.

The converter (convert_hf_to_gguf.py + its gguf-py) ships in the llama-cpp-python source distribution on PyPI. We
fetch that sdist once with pip and keep only the Python converter, in the slmforge cache; nothing is compiled.
The PyPI `gguf` package is not enough: the converter needs the vendored gguf-py of the same llama.cpp commit.
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from slmforge.models import cache_root

CONVERTER = "convert_hf_to_gguf.py"
CONVERTER_TYPES = ("f32", "f16", "bf16", "q8_0")  # written by the converter directly
QUANTIZER_TYPES = {"Q4_K_M": 15}  # llama_ftype values, made from the f16 file by llama.cpp's quantizer
KEEP = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/", "LICENSE")  # the parts of vendor/llama.cpp we need


class ConverterMissing(RuntimeError):
    pass


def _extract(sdist: Path, target: Path) -> Path:
    """Unpack only the Python converter of an sdist's vendor/llama.cpp (tens of files, not the 70 MB C++ tree)."""
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".extract-"))
    try:
        with tarfile.open(sdist) as tar:
            members = []
            for m in tar.getmembers():
                parts = m.name.split("/", 1)
                rel = parts[1] if len(parts) > 1 else ""
                if not rel.startswith("vendor/llama.cpp/") or not (m.isfile() or m.isdir()):
                    continue
                inner = rel[len("vendor/llama.cpp/"):]
                if any(inner == k or inner.startswith(k) for k in KEEP):
                    m.name = inner
                    members.append(m)
            if not any(m.name == CONVERTER for m in members):
                raise ConverterMissing(f"{sdist}: no vendor/llama.cpp/{CONVERTER} inside")
            tar.extractall(tmp, members=members, filter="data")
        (tmp / "SOURCE").write_text(f"extracted from {sdist.name}\n")
        shutil.rmtree(target, ignore_errors=True)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _fetch_sdist(dest: Path) -> Path:
    """`pip download --no-deps --no-binary :all: llama-cpp-python` (only the source archive, no build)."""
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
           "-d", str(dest), "llama-cpp-python"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    found = sorted(dest.glob("llama_cpp_python-*.tar.gz"))
    if proc.returncode != 0 or not found:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        raise ConverterMissing(
            f"could not download the llama-cpp-python sdist with pip ({tail[0]}); GGUF export needs llama.cpp's converter: "
            "set export.llama_cpp to a llama_cpp_python-*.tar.gz or a llama.cpp checkout, or export.gguf to []"
        )
    return found[-1]


def find_converter(spec: str = "auto", fetch: bool = True) -> Path:
    """The folder holding convert_hf_to_gguf.py and gguf-py/. Raises ConverterMissing with what to do."""
    root = cache_root() / "llama.cpp"
    root.mkdir(parents=True, exist_ok=True)
    if spec not in ("auto", ""):
        path = Path(spec).expanduser()
        if path.is_file() and path.name.endswith(".tar.gz"):
            target = root / path.name.removesuffix(".tar.gz")
            return target if (target / CONVERTER).is_file() else _extract(path, target)
        for candidate in (path, path / "vendor" / "llama.cpp"):
            if (candidate / CONVERTER).is_file() and (candidate / "gguf-py").is_dir():
                return candidate
        raise ConverterMissing(f"export.llama_cpp: {path} holds no {CONVERTER} with gguf-py/ beside it")
    ready = sorted(p.parent for p in root.glob(f"*/{CONVERTER}"))
    if ready:
        return ready[-1]
    if not fetch:
        raise ConverterMissing(f"no llama.cpp converter in {root}")
    sdist = _fetch_sdist(root / "sdist")
    folder = _extract(sdist, root / sdist.name.removesuffix(".tar.gz"))
    sdist.unlink()  # 75 MB of C++ we never build
    return folder


def converter_version(folder: Path) -> str:
    source = folder / "SOURCE"
    return source.read_text().strip() if source.is_file() else str(folder)


def convert(hf_folder: Path, out: Path, outtype: str, converter: Path, log: Path) -> Path:
    """Run llama.cpp's convert_hf_to_gguf.py with its vendored gguf-py."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(converter / "gguf-py"), str(converter)]), "NO_LOCAL_GGUF": ""}
    tmp = out.with_name(out.name + ".part")
    cmd = [sys.executable, str(converter / CONVERTER), str(hf_folder), "--outtype", outtype, "--outfile", str(tmp)]
    with open(log, "a") as f:
        f.write(f"$ {' '.join(cmd)}\n")
        f.flush()
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=converter)
    if proc.returncode != 0 or not tmp.is_file():
        raise RuntimeError(f"llama.cpp converter failed for {outtype} (exit {proc.returncode}); see {log}")
    os.replace(tmp, out)
    return out


def quantizer() -> tuple[str, object] | None:
    """llama.cpp's quantizer when installed: the llama_cpp Python binding, or the llama-quantize program."""
    try:
        import llama_cpp  # compiled llama-cpp-python (the optional 'llamacpp' extra)

        return "llama_cpp", llama_cpp
    except ImportError:
        pass
    exe = shutil.which("llama-quantize")
    return ("llama-quantize", exe) if exe else None


def quantize(src: Path, out: Path, qtype: str, tool: tuple[str, object]) -> Path:
    kind, handle = tool
    tmp = out.with_name(out.name + ".part")
    if kind == "llama_cpp":
        params = handle.llama_model_quantize_default_params()
        params.ftype = QUANTIZER_TYPES[qtype]
        rc = handle.llama_model_quantize(str(src).encode(), str(tmp).encode(), ctypes.byref(params))
    else:
        rc = subprocess.run([str(handle), str(src), str(tmp), qtype], capture_output=True).returncode
    if rc != 0 or not tmp.is_file():
        raise RuntimeError(f"llama.cpp quantizer ({kind}) failed for {qtype} (code {rc})")
    os.replace(tmp, out)
    return out


# ------------------------------------------------------------------------------------------ verification
def chat_inputs(tokenizer, prompts: list[str]) -> list[list[int]]:
    out = []
    for p in prompts:
        if getattr(tokenizer, "chat_template", None):
            ids = tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=True,
                                                return_dict=True)["input_ids"]
        else:
            ids = tokenizer(p)["input_ids"]
        out.append(list(ids))
    return out


def greedy(model, inputs: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    """Greedy continuations (token ids) of each prompt; the same ids go to both models, so tokenizers cannot differ.
    One prompt at a time (no padding), through slmforge.lm like every other caller of a model."""
    from slmforge.lm import Request
    from slmforge.lm.hf import TransformersLM

    lm = TransformersLM(model, None, "export-check", path="")
    return [lm.answer(Request(prompt_ids=ids, max_tokens=max_new_tokens, logprobs=False)).token_ids for ids in inputs]


def load_gguf(path: Path):
    """transformers' own GGUF loader (dequantized to fp32): an independent reader of what we wrote."""
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()


def greedy_llama_cpp(path: Path, inputs: list[list[int]], max_new_tokens: int) -> list[list[int]] | None:
    """Greedy continuations by llama.cpp itself, the program GGUF files are for; None when llama-cpp-python is not
    installed. Same prompt ids as greedy(); like transformers, an end-of-generation token is kept and ends the answer."""
    if importlib.util.find_spec("llama_cpp") is None:
        return None
    from slmforge.lm import Request
    from slmforge.lm.llamacpp import LlamaCppLM  # the backend `slmforge serve` runs GGUF files with

    lm = LlamaCppLM(path, path.name, n_ctx=max(map(len, inputs)) + max_new_tokens + 8)
    try:
        return [lm.answer(Request(prompt_ids=ids, max_tokens=max_new_tokens)).token_ids for ids in inputs]
    finally:
        lm.close()
