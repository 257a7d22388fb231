"""Merge candidates as mergekit configurations, and running one into a model folder.

mergekit (pip install 'slmforge[merge]') implements linear, SLERP, TIES and DARE merges over safetensors folders; we
only say which models and ratios. Every candidate gets the specialist's tokenizer and chat template.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path


def candidate_configs(specialist: tuple[str, str], base: str, stages: dict[str, str], cfg, seed: int) -> dict[str, dict]:
    """{name: mergekit configuration}. specialist = (stage, folder); stages = {stage: folder} of every trained model."""
    label, spec = specialist
    out: dict[str, dict] = {}
    for t in cfg.linear:  # weight t on the specialist, 1 - t on the base
        out[f"linear-{t:.2f}"] = {"merge_method": "linear", "dtype": "float32",
                                  "models": [{"model": spec, "parameters": {"weight": t}},
                                             {"model": base, "parameters": {"weight": 1 - t}}]}
    # t = 0 is the base model, t = 1 the specialist. mergekit falls back to linear interpolation for nearly colinear
    # tensors (|cos| > 0.9995), which a short fine-tune and its base are: on the demo slerp-0.75 came out byte-identical
    # to linear-0.75 (scored once: the score cache is keyed by the weights). SLERP differs once the models are further apart.
    for t in cfg.slerp:
        out[f"slerp-{t:.2f}"] = {"merge_method": "slerp", "dtype": "float32", "base_model": base,
                                 "models": [{"model": base}, {"model": spec}], "parameters": {"t": t}}
    if len(stages) >= 2:
        for method in cfg.stage_merges:
            models = [{"model": folder, "parameters": {"weight": 1 / len(stages), "density": cfg.density}}
                      for folder in stages.values()]
            params = {"normalize": True} if method != "dare_linear" else {}
            out[f"{method}({'+'.join(stages)})"] = {"merge_method": method, "dtype": "float32", "base_model": base,
                                                   "models": models, "parameters": params}
    return out


def run_merge(config: dict, out: Path, tokenizer_from: str, seed: int) -> Path:
    """Write the merge into `out` (complete or absent: built beside it, then renamed)."""
    try:
        from mergekit.config import MergeConfiguration
        from mergekit.merge import MergeOptions, run_merge as mergekit_run
    except ImportError:
        raise RuntimeError("the merge stage needs mergekit: pip install 'slmforge[merge]'") from None
    from transformers import AutoTokenizer

    tmp = out.with_name(out.name + ".part")
    shutil.rmtree(tmp, ignore_errors=True)
    mergekit_run(MergeConfiguration.model_validate(config), str(tmp),
                 MergeOptions(quiet=True, copy_tokenizer=False, write_model_card=False, random_seed=seed))
    AutoTokenizer.from_pretrained(tokenizer_from).save_pretrained(tmp)
    gen = Path(tokenizer_from) / "generation_config.json"
    if gen.is_file():
        shutil.copy2(gen, tmp / gen.name)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return out
