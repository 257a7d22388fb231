"""What DAPT, SFT and DPO share: the start model, LoRA, device-aware trainer arguments, resume, launch and the final save.

A stage prepares its data into scratch, then calls `train(kind, ...)`. Training runs in this process, or under
`accelerate launch` (DDP, or the FSDP/DeepSpeed config the recipe names) when `processes > 1`; both paths run the same
`run_job`, whose rank 0 writes model/ (merged), adapter/ (LoRA), log_history.json and tensorboard/ into the stage's out.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from slmforge.models import device_defaults, resolve_model
from slmforge.run import RunDir, Stage, atomic_write_json, atomic_write_jsonl, hash_obj, sha256_file

TRAIN_STAGES = ("dapt", "sft", "dpo")


# ------------------------------------------------------------------------------------------ start model
def start_model(recipe, run: RunDir, stage: str) -> tuple[str, str]:
    """(model folder or id, content hash) a stage starts from: the nearest earlier enabled training stage, else the base."""
    for prev in reversed(TRAIN_STAGES[: TRAIN_STAGES.index(stage)]):
        if getattr(recipe, prev).enabled:
            folder = run.require(prev, "model")
            outputs = run.manifest(prev)["outputs"]
            return str(folder), hash_obj({k: v for k, v in outputs.items() if k.startswith("model/")})
    return resolve_model(recipe.base_model), model_fingerprint(recipe.base_model)


def model_fingerprint(spec: str) -> str:
    """A cheap content key of a model: the GGUF-converted default is already keyed by its hash; folders by weights."""
    path = Path(resolve_model(spec))
    if not path.is_dir():
        return hash_obj({"hub_id": spec})
    weights = sorted(path.glob("*.safetensors")) or sorted(path.glob("*.bin"))
    if len(weights) == 1 and weights[0].stat().st_size < 2 << 30:
        return sha256_file(weights[0])
    return hash_obj({"path": str(path), "files": [(w.name, w.stat().st_size, w.stat().st_mtime_ns) for w in weights]})


def load_model_and_tokenizer(path: str, cfg):
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
    if cfg["method"] == "lora":
        from peft import LoraConfig, get_peft_model

        lora = cfg["lora"]
        model = get_peft_model(model, LoraConfig(r=lora["r"], lora_alpha=lora["alpha"], lora_dropout=lora["dropout"],
                                                 target_modules=lora["target_modules"], task_type="CAUSAL_LM"))
    return model, tok


def attn_implementation() -> str:
    """"sdpa" on GPUs; on CPU "sdpa_varlen" (registered here): SDPA per packed document, see `_varlen_sdpa`."""
    import torch

    if torch.cuda.is_available():
        return "sdpa"
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(VARLEN_SDPA, _varlen_sdpa)
    AttentionMaskInterface.register(VARLEN_SDPA, sdpa_mask)  # padded batches and generation keep SDPA's own masks
    return VARLEN_SDPA


VARLEN_SDPA = "sdpa_varlen"


def _varlen_sdpa(module, query, key, value, attention_mask, dropout=0.0, scaling=None, cu_seq_lens_q=None, **kwargs):
    """Causal SDPA on each document of a padding-free packed batch (one row; TRL's collator passes `cu_seq_lens_q`).

    The same result as SDPA with the block-diagonal mask transformers builds from the restarting position_ids, but with
    an explicit mask CPU SDPA computes the whole row x row score matrix (~1k x 1k per layer for 4 x 256-token blocks):
    its backward alone was ~17% of an SFT step. Per document it costs each document's length squared, on the unmasked
    causal kernel. (torch's varlen_attn and flash-attn are CUDA-only.) Anything else goes to transformers' SDPA.
    """
    import torch
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if cu_seq_lens_q is None or query.shape[0] != 1 or query.shape[2] != key.shape[2] or not getattr(module, "is_causal", True):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    lengths = cu_seq_lens_q.diff().tolist()
    gqa = query.shape[1] != key.shape[1]
    # fp32 even under bf16 autocast: CPU flash attention's bf16 backward is slower than its fp32 one (measured 4.7 vs
    # 3.8 ms fwd+bwd per 256-token document), and RoPE has already made q and k fp32. split, not slicing: its backward
    # concatenates instead of zero-filling a full-size gradient per document.
    with torch.autocast("cpu", enabled=False):
        out = torch.cat([torch.nn.functional.scaled_dot_product_attention(
            q, k, v, dropout_p=dropout, is_causal=True, scale=scaling, enable_gqa=gqa)
            for q, k, v in zip(*(t.float().split(lengths, dim=2) for t in (query, key, value)))], dim=2)
    return out.to(value.dtype).transpose(1, 2).contiguous(), None  # bf16 under autocast: o_proj's input dtype


class FineTuneStage(Stage):
    """What SFT and DPO share: rows of generate/<source> -> the usable ones in scratch -> a job from the previous model."""

    source = ""  # file name under generate/

    def inputs(self, recipe, run):
        data = run.artifact_hash("generate", self.source)  # first: a clear error when generate has not run
        _, model_key = start_model(recipe, run, self.name)
        return {self.name: data, "model": model_key}

    def train_on(self, ctx, rows: list[dict], counts: dict) -> None:
        """Write `rows` as the training data, then train from the start model; `counts` go to the manifest first."""
        data = ctx.scratch / self.source
        atomic_write_jsonl(data, rows)
        model_path, _ = start_model(ctx.recipe, ctx.run, self.name)
        ctx.counts.update({**counts, "start_model": model_path})
        ctx.counts.update(train(self.name, model=model_path, data=data, ctx=ctx, cfg=getattr(ctx.recipe, self.name)))

    def summary_rows(self, counts):
        return summary_rows(self.name, counts)


# ------------------------------------------------------------------------------------------ trainer arguments
def trainer_kwargs(cfg: dict, output_dir: Path, seed: int) -> dict:
    """TrainingArguments fields every stage uses: no activation checkpointing on CPU, bf16 autocast where it is fast."""
    import torch

    cuda = torch.cuda.is_available()
    bf16 = {"bf16": True, "fp32": False}.get(cfg["precision"], cuda and torch.cuda.is_bf16_supported() or cpu_fast_bf16())
    checkpointing = cfg["gradient_checkpointing"] if cfg["gradient_checkpointing"] is not None else False
    return dict(
        output_dir=str(output_dir),
        max_steps=cfg["max_steps"],
        per_device_train_batch_size=cfg["batch_size"],
        gradient_accumulation_steps=cfg["grad_accum"],
        learning_rate=cfg["learning_rate"],
        warmup_steps=math.ceil(cfg["warmup_ratio"] * cfg["max_steps"]),
        weight_decay=cfg["weight_decay"],
        optim="adamw_torch_fused",  # transformers' default today, pinned: 9% faster SFT steps here than adamw_torch
        logging_steps=cfg["logging_steps"],
        save_strategy="steps",
        save_steps=cfg["save_steps"],
        save_total_limit=2,
        report_to=cfg["report_to"],
        bf16=bf16,
        fp16=cuda and not bf16 and cfg["precision"] != "fp32",
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


def progress_callback(description: str):
    """A TrainerCallback that advances a slmforge.console.track bar once per optimizer step (rank 0 only)."""
    from transformers import TrainerCallback

    from slmforge.console import console, track

    class Progress(TrainerCallback):
        bar = None

        def on_train_begin(self, args, state, control, **kw):
            if state.is_world_process_zero:
                self.bar = iter(track(range(state.max_steps), description, total=state.max_steps))
                for _ in range(state.global_step + 1):  # resumed runs start part-way
                    next(self.bar, None)

        def on_step_end(self, args, state, control, **kw):
            if self.bar is not None:
                next(self.bar, None)

        def on_log(self, args, state, control, logs=None, **kw):
            if self.bar is not None and logs and "loss" in logs and os.environ.get("SLMFORGE_QUIET") != "1":
                console.print(f"  step {state.global_step}: loss {logs['loss']:.4f}, lr {logs.get('learning_rate', 0):.2e}",
                              highlight=False)

        def on_train_end(self, args, state, control, **kw):
            if self.bar is not None:
                for _ in self.bar:  # exhaust: closes the bar
                    pass

    return Progress()


def last_checkpoint(output_dir: Path) -> str | None:
    """The newest *complete* checkpoint. transformers' get_last_checkpoint takes the highest-numbered folder, but a
    kill while the Trainer is saving leaves a folder without (or with a truncated) trainer_state.json, which the Trainer
    writes last and not atomically; such folders are removed so the rerun saves that step again."""
    if not output_dir.is_dir():
        return None
    folders = [p for p in output_dir.glob("checkpoint-*") if p.is_dir() and p.name.split("-")[-1].isdigit()]
    for folder in sorted(folders, key=lambda p: int(p.name.split("-")[-1]), reverse=True):
        try:
            json.loads((folder / "trainer_state.json").read_text(encoding="utf-8"))["global_step"]
            return str(folder)
        except (OSError, ValueError, KeyError, TypeError):
            shutil.rmtree(folder, ignore_errors=True)
    return None


# ------------------------------------------------------------------------------------------ the job
def run_job(job: dict) -> dict:
    """Train one stage (any rank). `job` is JSON-able: kind, model, data, output_dir, out, config, seed, extra."""
    import importlib

    from datasets import load_dataset
    from transformers.trainer_callback import PrinterCallback

    module = importlib.import_module(f"slmforge.train.{job['kind']}")
    output_dir, out, cfg = Path(job["output_dir"]), Path(job["out"]), job["config"]
    model, tok = load_model_and_tokenizer(job["model"], cfg)
    dataset = load_dataset("json", data_files=job["data"], split="train")
    trainer = module.make_trainer(model, tok, dataset, trainer_kwargs(cfg, output_dir, job["seed"]), job)
    trainer.remove_callback(PrinterCallback)  # raw log dicts on stdout; the progress callback prints a tidy line instead
    trainer.add_callback(progress_callback(f"{job['kind']} steps"))
    resume = last_checkpoint(output_dir)
    resumed_from = int(Path(resume).name.split("-")[-1]) if resume else 0
    started = time.time()
    trainer.train(resume_from_checkpoint=resume)
    seconds = time.time() - started
    state = trainer.state
    summary = {}
    if trainer.is_world_process_zero():
        save_outputs(trainer, tok, job["model"], out, cfg["method"] == "lora")
        losses = [h["loss"] for h in state.log_history if "loss" in h]
        tokens_seen = int(state.num_input_tokens_seen)
        session_tokens = tokens_seen - _tokens_at(state.log_history, resumed_from)
        summary = {
            "steps": state.global_step,
            "resumed_from_step": resumed_from,
            "tokens_seen": tokens_seen,
            "final_loss": round(losses[-1], 4) if losses else None,
            "first_loss": round(losses[0], 4) if losses else None,
            "train_seconds": round(seconds, 1),
            "tokens_per_s": round(session_tokens / seconds, 1) if seconds > 0 else None,
            "processes": int(os.environ.get("WORLD_SIZE", "1")),
            "method": cfg["method"],
            "device": device_defaults()["device"],
            "bf16_autocast": bool(trainer.args.bf16),
        }
        atomic_write_json(output_dir / "result.json", summary)
    trainer.accelerator.wait_for_everyone()
    return summary


def _tokens_at(log_history: list[dict], step: int) -> int:
    """Tokens seen when the run resumed (from the last log entry at or before that step)."""
    seen = [h["num_input_tokens_seen"] for h in log_history if "num_input_tokens_seen" in h and h.get("step", 0) <= step]
    return int(seen[-1]) if seen and step else 0


def save_outputs(trainer, tok, source: str, out: Path, lora: bool) -> None:
    """model/ (complete; LoRA merged), adapter/ (LoRA), log_history.json, tensorboard/ into the stage's out folder."""
    model = trainer.accelerator.unwrap_model(trainer.model)
    if lora:
        model.save_pretrained(out / "adapter")
        tok.save_pretrained(out / "adapter")
        model = model.merge_and_unload()
    model.config.use_cache = True  # the Trainer turns the KV cache off for training; generation wants it back
    model.save_pretrained(out / "model", safe_serialization=True)
    # the source's own tokenizer files: the chat template on disk stays the base's (training-only markers never leak)
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(source).save_pretrained(out / "model")
    atomic_write_json(out / "log_history.json", trainer.state.log_history)
    runs = Path(trainer.args.output_dir) / "runs"
    if runs.is_dir():  # tensorboard event files (report_to) kept beside the model for the run report
        shutil.copytree(runs, out / "tensorboard", dirs_exist_ok=True)


def train(kind: str, *, model: str, data: Path, ctx, cfg, extra: dict | None = None) -> dict:
    """Run a training job for a stage, in process or under `accelerate launch`; return its summary counts."""
    output_dir = ctx.scratch / "checkpoints"  # survives a kill: the rerun resumes from the last checkpoint here
    job = {"kind": kind, "model": model, "data": str(data), "output_dir": str(output_dir), "out": str(ctx.out),
           "config": cfg.model_dump(mode="json"), "seed": ctx.recipe.seed, "extra": extra or {}}
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "result.json").unlink(missing_ok=True)
    if cfg.processes == 1 and cfg.accelerate_config is None:
        run_job(job)
    else:
        launch(job, cfg, output_dir)
    return json.loads((output_dir / "result.json").read_text())


def launch(job: dict, cfg, output_dir: Path) -> None:
    """`accelerate launch` this job: DDP over `processes` (gloo on CPU), or the FSDP/DeepSpeed config file given."""
    import torch

    spec = output_dir / "job.json"
    atomic_write_json(spec, job)
    cmd = [sys.executable, "-m", "accelerate.commands.launch"]
    if cfg.accelerate_config is not None:
        cmd += ["--config_file", str(cfg.accelerate_config)]
    else:
        cmd += ["--num_processes", str(cfg.processes), "--num_machines", "1", "--mixed_precision", "no",
                "--dynamo_backend", "no", "--main_process_port", str(_free_port())]
        # --multi_gpu is accelerate's torchrun launcher; on CPU it starts the processes and gloo connects them
        # (accelerate's --cpu path wants mpirun and a hostfile for more than one process)
        cmd += ["--multi_gpu"] if cfg.processes > 1 else []
    cmd += ["-m", "slmforge.train.common", str(spec)]
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, len(os.sched_getaffinity(0)) // cfg.processes))}
    if not torch.cuda.is_available():
        env["ACCELERATE_USE_CPU"] = "true"
    proc = subprocess.run(cmd, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"`accelerate launch` for {job['kind']} failed (exit {proc.returncode}); command: {' '.join(cmd)}")


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def summary_rows(stage: str, counts: dict) -> list[tuple[str, str]]:
    if not counts:
        return []
    rows = [(f"{stage}: steps", f"{counts.get('steps')} ({counts.get('method')}, resumed from {counts.get('resumed_from_step', 0)})"),
            (f"{stage}: tokens seen", f"{counts.get('tokens_seen', 0):,}"),
            (f"{stage}: loss first → final", f"{counts.get('first_loss')} → {counts.get('final_loss')}"),
            (f"{stage}: tokens/s", f"{counts.get('tokens_per_s')}")]
    return rows


if __name__ == "__main__":  # the entry point `accelerate launch -m slmforge.train.common job.json` runs on every rank
    run_job(json.loads(Path(sys.argv[1]).read_text()))
