"""TrainingArguments every training stage shares, from its typed recipe section, and the device checks behind them."""

from __future__ import annotations

import math
import os
from pathlib import Path

from slmforge.recipe import TrainSection


def trainer_kwargs(cfg: TrainSection, output_dir: Path, seed: int) -> dict:
    """TrainingArguments fields every stage uses: no activation checkpointing on CPU, bf16 autocast where it is fast."""
    import torch

    cuda = torch.cuda.is_available()
    # "auto" is settled before a build runs (slmforge/budget: the faster of the two, timed on real steps); it reaches
    # here only when a stage is run without the CLI, and then the CPU flag decides
    bf16 = {"bf16": True, "fp32": False}.get(cfg.precision, cuda and torch.cuda.is_bf16_supported() or cpu_fast_bf16())
    checkpointing = cfg.gradient_checkpointing if cfg.gradient_checkpointing is not None else False
    return dict(
        output_dir=str(output_dir),
        max_steps=cfg.max_steps,
        per_device_train_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum,
        learning_rate=cfg.learning_rate,
        warmup_steps=math.ceil(cfg.warmup_ratio * cfg.max_steps),
        weight_decay=cfg.weight_decay,
        optim="adamw_torch_fused",  # transformers' default today, pinned: 9% faster SFT steps here than adamw_torch
        logging_steps=cfg.logging_steps,
        save_strategy="steps",
        save_steps=cfg.save_steps,
        save_total_limit=2,
        report_to=cfg.report_to,
        bf16=bf16,
        fp16=cuda and not bf16 and cfg.precision != "fp32",
        activation_checkpointing=checkpointing,  # (TRL configs default the old name, gradient_checkpointing, to True)
        use_cpu=not cuda,
        ddp_backend="gloo" if not cuda and int(os.environ.get("WORLD_SIZE", "1")) > 1 else None,
        ddp_find_unused_parameters=False,  # every parameter takes part; True costs an extra graph traversal per step
        seed=seed,
        data_seed=seed,
        dataloader_num_workers=0,
        disable_tqdm=True,  # our own bar (slmforge.console.track) shows progress with an ETA
        include_num_input_tokens_seen="non_padding",
    )


def accelerate_settings(cfg: TrainSection):
    """The accelerate config file the recipe names, read by accelerate's own loader (None when the recipe names none)."""
    if cfg.accelerate_config is None:
        return None
    from accelerate.commands.config.config_args import load_config_from_file

    return load_config_from_file(str(cfg.accelerate_config))


def world_size(cfg: TrainSection) -> int:
    """How many processes train together: `processes`, or the `num_processes` (all machines) of the accelerate config,
    which `accelerate launch --config_file` uses whatever `processes` says. The stages size their data to the global
    batch (max_steps x batch_size x grad_accum x this): counted short, the run repeats its data from the first epoch's
    end, and its loss curve leaves the one of a single process on the same global batch."""
    settings = accelerate_settings(cfg)
    if settings is None:
        return cfg.processes
    n = getattr(settings, "num_processes", None)
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"{cfg.accelerate_config}: num_processes is not set; name it (all machines together), the "
                         "training data is sized to the global batch")
    if cfg.processes not in (1, n):
        raise ValueError(f"processes: {cfg.processes} but {cfg.accelerate_config} has num_processes: {n} (the one "
                         "`accelerate launch` uses); set one of them")
    return n


def triton_lm_head() -> bool:
    """Whether TRL's chunked log-prob LM head runs as its Triton kernel (CUDA with Triton), not as torch fallbacks."""
    import torch
    from transformers.utils import is_triton_available

    return torch.cuda.is_available() and is_triton_available()


def cpu_fast_bf16() -> bool:
    """True on CPUs with AMX bf16 tiles (Sapphire Rapids and later): bf16 autocast trains ~1.8x faster there than fp32.

    CPUs without bf16 instructions emulate it (~100x slower): fp32 there. Weights and optimizer state stay fp32 either way.
    """
    import torch

    return not torch.cuda.is_available() and hasattr(torch.cpu, "_is_amx_tile_supported") and torch.cpu._is_amx_tile_supported()
