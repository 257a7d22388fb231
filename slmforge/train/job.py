"""One training job: a stage's data and start model -> a Trainer -> model/ (LoRA merged), adapter/, log_history.json and
tensorboard/ in the stage's out folder. It runs in this process, or under `accelerate launch` (DDP, or the FSDP/DeepSpeed
config the recipe names) when `processes > 1`; both paths run the same `run_job`, whose rank 0 writes the outputs.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

from slmforge.artifacts import DAPT, DPO, SFT, adapter, log_history, tensorboard, trained_model
from slmforge.models import device_defaults
from slmforge.recipe import DaptConfig, DpoConfig, SftConfig, TrainSection
from slmforge.run import atomic_write_json
from slmforge.train.arguments import accelerate_settings, trainer_kwargs, world_size
from slmforge.train.checkpoints import last_checkpoint
from slmforge.train.loading import load_model_and_tokenizer
from slmforge.train.progress import progress_callback

SECTIONS: dict[str, type[TrainSection]] = {DAPT: DaptConfig, SFT: SftConfig, DPO: DpoConfig}


def _trainer_factory(kind: str):
    """make_trainer(model, tok, dataset, trainer kwargs, cfg) of each training stage."""
    from slmforge.train import dapt, dpo, sft

    return {DAPT: dapt.make_trainer, SFT: sft.make_trainer, DPO: dpo.make_trainer}[kind]


def run_job(job: dict) -> dict:
    """Train one stage (any rank). `job` is JSON-able (it crosses `accelerate launch`): kind, model, data, output_dir,
    out, config (the stage's recipe section, validated again here), seed."""
    from datasets import load_dataset
    from transformers.trainer_callback import PrinterCallback

    output_dir, out = Path(job["output_dir"]), Path(job["out"])
    cfg = SECTIONS[job["kind"]].model_validate(job["config"])
    model, tok = load_model_and_tokenizer(job["model"], cfg)
    dataset = load_dataset("json", data_files=job["data"], split="train")
    trainer = _trainer_factory(job["kind"])(model, tok, dataset, trainer_kwargs(cfg, output_dir, job["seed"]), cfg)
    trainer.remove_callback(PrinterCallback)  # raw log dicts on stdout; the progress callback prints a tidy line instead
    trainer.add_callback(progress_callback(f"{job['kind']} steps"))
    deadline = deadline_callback(job["deadline"]) if job.get("deadline") else None
    if deadline is not None:
        trainer.add_callback(deadline)
    enable_fsdp2_on_cpu(trainer)
    distributed = distributed_kind(trainer.accelerator)
    requested = _requested_kind(cfg)
    if requested and not distributed.startswith(requested) and trainer.is_world_process_zero():
        _warn_not_sharded(cfg, requested, distributed, trainer.accelerator.device.type)
    # FSDP and DeepSpeed shard the weights over the ranks: the full model is gathered by every rank together below
    sharded = bool(trainer.is_fsdp_enabled or trainer.is_deepspeed_enabled)
    if sharded and cfg.method == "lora":
        raise ValueError(f"{job['kind']}: method lora under an FSDP/DeepSpeed accelerate_config is not supported (its "
                         "adapter would be saved and merged from sharded weights); use method: full, or DDP (processes)")
    resume = last_checkpoint(output_dir)
    resumed_from = int(Path(resume).name.split("-")[-1]) if resume else 0
    started = time.time()
    trainer.train(resume_from_checkpoint=resume)
    seconds = time.time() - started
    state = trainer.state
    summary = {}
    rank0_share = _local_parameter_share(trainer.model)
    train_peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024  # Linux: KiB; before the gather below
    full_state = trainer.accelerator.get_state_dict(trainer.model) if sharded else None  # a collective: every rank
    if trainer.is_world_process_zero():
        save_outputs(trainer, tok, job["model"], out, cfg.method == "lora", job["kind"], state_dict=full_state)
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
            "distributed": distributed,  # what ran, read back from accelerate: none, ddp, fsdp2, fsdp1, deepspeed
            "rank0_parameter_share": rank0_share,  # of the model's parameters held by rank 0: 1.0 unless sharded
            "rank0_train_peak_rss_mb": train_peak_mb,  # this process's memory high-water mark while it trained
            "method": cfg.method,
            "device": device_defaults()["device"],
            "bf16_autocast": bool(trainer.args.bf16),
            "planned_steps": cfg.max_steps,
            "stopped_at_deadline": bool(deadline is not None and deadline.stopped),
        }
        atomic_write_json(output_dir / "result.json", summary)
    trainer.accelerator.wait_for_everyone()
    return summary


def enable_fsdp2_on_cpu(trainer) -> bool:
    """Run an FSDP2 accelerate config as FSDP2 on CPU processes too. torch's FSDP2 (`fully_shard`) shards over gloo on
    CPU, but accelerate 1.15 sets FSDP only for GPU-like device types (accelerate/state.py, AcceleratorState.__init__:
    CPU processes are MULTI_CPU and the FSDP plugin is dropped). So, when `accelerate launch` was given an FSDP2
    config (its ACCELERATE_USE_FSDP / FSDP_* environment) and the processes are CPU ones, this builds accelerate's
    own plugin from that environment, as Accelerator.__init__ does, and switches the shared state to FSDP before the
    Trainer prepares the model. From there everything is accelerate's and TRL's own FSDP2 path: `fully_shard` per
    the wrap policy, sharded checkpoints through torch.distributed.checkpoint, the full state dict gathered at the
    end. Called after the Trainer is built and before it trains; True when it switched. FSDP1 stays DDP on CPU
    (its CPU support is not maintained upstream), as does DeepSpeed (it needs an accelerator)."""
    from accelerate import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    accelerator = trainer.accelerator
    if accelerator.distributed_type != DistributedType.MULTI_CPU or os.environ.get("ACCELERATE_USE_FSDP", "false").lower() != "true":
        return False
    plugin = FullyShardedDataParallelPlugin()  # reads the FSDP_* variables `accelerate launch` set from the config
    if plugin.fsdp_version != 2:
        return False
    if accelerator.state.mixed_precision != "no":
        plugin.set_mixed_precision(accelerator.state.mixed_precision)
    # both shared states: every AcceleratorState() made later copies PartialState's fields over its own
    PartialState().distributed_type = accelerator.state.distributed_type = DistributedType.FSDP
    accelerator.state.fsdp_plugin = plugin
    trainer.is_fsdp_enabled = True  # what Trainer.create_accelerator_and_postprocess derives from the state's plugin
    return True


def distributed_kind(accelerator) -> str:
    """What the Trainer's accelerator runs: none (1 process), ddp, fsdp2 / fsdp1, deepspeed (or accelerate's own name
    for anything else). Read back from accelerate, not taken from the config: accelerate 1.15 applies FSDP and
    DeepSpeed only on GPU-like devices (accelerate/state.py, AcceleratorState.__init__: DEEPSPEED needs `not cpu`, FSDP
    is set only for the MULTI_GPU/NPU/XPU/... types, and CPU processes are MULTI_CPU), so on CPU those configs run DDP."""
    from accelerate.utils import DistributedType

    kind = accelerator.distributed_type
    if kind == DistributedType.FSDP:
        return f"fsdp{accelerator.state.fsdp_plugin.fsdp_version}"
    if kind == DistributedType.NO:
        return "none"
    return "ddp" if kind.value.startswith("MULTI_") else kind.value.lower()


def _requested_kind(cfg) -> str | None:
    """'fsdp' or 'deepspeed' when the recipe's accelerate config asks for one of them."""
    settings = accelerate_settings(cfg)
    kind = getattr(getattr(settings, "distributed_type", None), "value", None)
    return {"FSDP": "fsdp", "DEEPSPEED": "deepspeed"}.get(kind)


def _warn_not_sharded(cfg, requested: str, distributed: str, device: str) -> None:
    """A warning, not an error: the run is still correct data-parallel training (the same model as 1 process on the
    same global batch, tests/test_train.py), and running a GPU config on a CPU machine is a useful smoke test; what
    is missing is the sharding, so every process holds the whole model, gradients and optimizer state."""
    from slmforge.console import console

    console.print(f"  [yellow]warning:[/yellow] {cfg.accelerate_config} asks for {requested.upper()}, but accelerate "
                  f"runs {distributed.upper()} on {device.upper()} here (it applies FSDP and DeepSpeed only on GPUs). "
                  "Nothing is sharded: every process holds the whole model, its gradients and optimizer state; the "
                  f"manifest records distributed: {distributed}.", highlight=False)


def _local_parameter_share(model) -> float:
    """The share of the model's parameter elements this rank holds (FSDP2's DTensors hold a shard each)."""
    total = local = 0
    for p in model.parameters():
        total += p.numel()
        local += p.to_local().numel() if hasattr(p, "to_local") else p.numel()
    return round(local / total, 4) if total else 1.0


def _tokens_at(log_history: list[dict], step: int) -> int:
    """Tokens seen when the run resumed (from the last log entry at or before that step)."""
    seen = [h["num_input_tokens_seen"] for h in log_history if "num_input_tokens_seen" in h and h.get("step", 0) <= step]
    return int(seen[-1]) if seen and step else 0


def train(kind: str, *, model: str, data: Path, ctx, cfg: TrainSection) -> dict:
    """Run a training job for a stage, in process or under `accelerate launch`; return its summary counts. In a
    budgeted build, a job in this process stops at the build's deadline for the stage (deadline_callback)."""
    from slmforge import console

    output_dir = ctx.scratch / "checkpoints"  # survives a kill: the rerun resumes from the last checkpoint here
    job = {"kind": kind, "model": model, "data": str(data), "output_dir": str(output_dir), "out": str(ctx.out),
           "config": cfg.model_dump(mode="json"), "seed": ctx.recipe.seed}
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "result.json").unlink(missing_ok=True)
    if cfg.processes == 1 and cfg.accelerate_config is None:
        clock = console.build_clock
        # (not under accelerate launch: ranks deciding on their own clocks could stop at different steps)
        run_job({**job, "deadline": clock.deadline if clock is not None else None})
    else:
        launch(job, cfg, output_dir)
    result = json.loads((output_dir / "result.json").read_text())
    if result.get("stopped_at_deadline"):
        console.console.print(f"  [yellow]{kind} stopped at step {result['steps']} of {result['planned_steps']}: the "
                              "next step would have ended past the build's budget (its plan was optimistic; the "
                              "budget's stages ahead keep their planned time)[/yellow]")
    return result


def deadline_callback(deadline: float):
    """A TrainerCallback that ends training when the next optimizer step, at the mean pace of those before it (at least
    one measured), would end after `deadline` (epoch seconds); the Trainer then finishes as at max_steps (the model
    is saved as usual) and `stopped` says it happened. The learning-rate schedule is cut where it stands."""
    from transformers import TrainerCallback

    class Deadline(TrainerCallback):
        stopped = False
        began: float | None = None
        steps = 0

        def on_step_begin(self, args, state, control, **kw):
            if self.began is None:
                self.began = time.time()

        def on_step_end(self, args, state, control, **kw):
            self.steps += 1
            pace = (time.time() - self.began) / self.steps
            if state.global_step < state.max_steps and time.time() + pace > deadline:
                self.stopped = control.should_training_stop = True

    return Deadline()


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
    cmd += ["-m", "slmforge.train.job", str(spec)]
    settings = accelerate_settings(cfg)
    local = max(1, world_size(cfg) // max(1, getattr(settings, "num_machines", 1) or 1))  # processes on this machine
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, len(os.sched_getaffinity(0)) // local))}
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


def save_outputs(trainer, tok, source: str, out: Path, lora: bool, kind: str, state_dict: dict | None = None) -> None:
    """The stage's model (complete; LoRA merged), adapter (LoRA), log history and tensorboard events into its out folder.
    `state_dict`: the full weights gathered from the ranks when training sharded them (FSDP, DeepSpeed ZeRO-3)."""
    model = trainer.accelerator.unwrap_model(trainer.model)
    if state_dict is not None:
        model = _plain_copy(model, state_dict)
    if lora:
        model.save_pretrained(out / adapter(kind).name)
        tok.save_pretrained(out / adapter(kind).name)
        model = model.merge_and_unload()
    model.config.use_cache = True  # the Trainer turns the KV cache off for training; generation wants it back
    folder = out / trained_model(kind).name
    model.save_pretrained(folder, safe_serialization=True)
    # the source's own tokenizer files: the chat template on disk stays the base's (training-only markers never leak)
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(source).save_pretrained(folder)
    atomic_write_json(out / log_history(kind).name, trainer.state.log_history)
    runs = Path(trainer.args.output_dir) / "runs"
    if runs.is_dir():  # tensorboard event files (report_to) kept beside the model for the run report
        shutil.copytree(runs, out / tensorboard(kind).name, dirs_exist_ok=True)


def _plain_copy(model, state_dict: dict):
    """An unsharded copy of a sharded model holding the gathered full weights. Under FSDP2 the trained model's
    parameters stay DTensors on every rank, and save_pretrained on rank 0 alone touches them (tied-weight checks),
    which waits on a collective the other ranks never join. Rank 0 holds the full weights once more while it saves."""
    from transformers import AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    with no_init_weights():  # every weight is overwritten below: random init would only cost time (3 s at 135M)
        plain = AutoModelForCausalLM.from_config(model.config, dtype=next(iter(state_dict.values())).dtype)
    missing, unexpected = plain.load_state_dict(state_dict, strict=False)
    tied = set(getattr(plain, "_tied_weights_keys", None) or {})
    if unexpected or set(missing) - tied:
        raise RuntimeError(f"the gathered weights do not fit {type(plain).__name__}: missing {sorted(missing)[:5]}, "
                           f"unexpected {sorted(unexpected)[:5]}")
    plain.tie_weights()
    return plain


if __name__ == "__main__":  # the entry point `accelerate launch -m slmforge.train.job job.json` runs on every rank
    run_job(json.loads(Path(sys.argv[1]).read_text()))
