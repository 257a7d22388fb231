"""The start model of a training job, in the device's training dtype, with LoRA when the recipe asks for it."""

from __future__ import annotations

import os

from slmforge.models import device_defaults
from slmforge.recipe import TrainSection
from slmforge.train.attention import attn_implementation


def load_model_and_tokenizer(path: str, cfg: TrainSection):
    """The causal LM in the device's training dtype, wrapped with LoRA when the recipe asks for it."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dev = device_defaults()
    if dev["device"] == "cpu" and int(os.environ.get("LOCAL_WORLD_SIZE", "1")) > 1:
        torch.set_num_threads(max(1, torch.get_num_threads() // int(os.environ["LOCAL_WORLD_SIZE"])))  # share the cores
    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dev["dtype"], attn_implementation=attn_implementation())
    if cfg.method == "lora":
        from peft import LoraConfig, get_peft_model

        lora = cfg.lora
        model = get_peft_model(model, LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                                 target_modules=lora.target_modules, task_type="CAUSAL_LM"))
    return model, tok
