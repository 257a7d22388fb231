"""Short timed runs of the real model on this machine, whose figures the budget planner and `precision: auto` use.

Training: optimizer steps (forward + backward + fused AdamW, as the Trainer runs them) on padding-free packed blocks
through the same collator and attention kernel as DAPT, at two sizes, so a step costs `step_s + tokens * token_s`;
in fp32 and under bf16 autocast (the faster one is `precision: auto`'s choice). Also forward-only time per token
(eval log-likelihoods, DPO reference log-probs), one checkpoint save (weights + AdamW state, as the Trainer writes
them) and the model's load time. Generation: batched greedy decoding of the teacher at two lengths, so a batch costs
`prefill_token_s * prompt tokens + decode_step_s * new tokens`.

Everything is cached per machine (CPU model, cores, torch threads and version) and per model identity under
$SLMFORGE_CACHE/probes: a second build reads the same figures, so its plan is the same and no stage reruns.
"""

from __future__ import annotations

import os
import platform
import tempfile
import time
from pathlib import Path

from pydantic import BaseModel, Field

from slmforge.models import cache_root, cpu_threads
from slmforge.run import atomic_write_json, hash_obj

PROBE_VERSION = 2  # 2: each shape warmed before it is timed
BLOCK = 256  # tokens per packed block in the training probe (DAPT's default max_length)
PROMPT_TOKENS = 96  # prompt length of the generation probe
SLOWER_BF16 = 3.0  # a first bf16 step this many times slower than fp32 means emulated bf16: not measured further


class StepFigures(BaseModel):
    """One precision's training step: seconds = step_s + tokens * token_s (per micro-batch)."""

    token_s: float = Field(description="seconds per token of a training step (forward, backward, optimizer)")
    step_s: float = Field(description="seconds per step whatever its size (optimizer, launch overheads)")
    forward_token_s: float = Field(description="seconds per token of a forward pass without gradients")
    measured: dict[str, float] = Field(default_factory=dict, description="raw timings: step seconds at each size")


class GenerateFigures(BaseModel):
    decode_step_s: float = Field(description="seconds per decoding step of the whole batch")
    prefill_token_s: float = Field(description="seconds per prompt token of prefill")


class Figures(BaseModel):
    """What the probes measured on one machine for one model."""

    version: int = PROBE_VERSION
    machine: dict
    model: str = Field(description="model identity (content hash of weights and tokenizer)")
    train: dict[str, StepFigures] = Field(description="fp32 / bf16 -> step figures (bf16 absent when not measured)")
    bf16_note: str = ""
    precision: str = Field(description="the faster precision: bf16 or fp32 (precision: auto's choice)")
    save_s: float = Field(description="one checkpoint save: weights + optimizer state")
    load_s: float = Field(description="loading the model")
    generate: dict[str, GenerateFigures] = Field(default_factory=dict, description="batch size -> generation figures "
                                                 "of the model itself (eval, replay, a self-teacher)")
    teacher_generate: dict[str, GenerateFigures] = Field(default_factory=dict, description="the same for a separate "
                                                         "in-process teacher model (empty = the model teaches itself)")
    probe_s: float = Field(0.0, description="wall-clock seconds the probes took")
    load: float = Field(0.0, description="the machine's 1-minute load average when probed (busy machines measure slow)")
    contention: float = Field(0.0, description="share of the training probes' runnable time their threads spent "
                              "waiting for a core (Linux run-queue wait, /proc/self/task/*/schedstat); over 0.3, other "
                              "processes held the cores and the figures are slow")
    cached: bool = Field(False, description="read from the probe cache (this build spent no time probing)")

    def step_seconds(self, tokens: float, precision: str | None = None) -> float:
        f = self.train[precision or self.precision]
        return f.step_s + tokens * f.token_s

    def generation(self, batch: int, teacher: bool = False) -> GenerateFigures:
        """Figures of the nearest probed batch size, scaled linearly in the batch for decode steps."""
        table = self.teacher_generate if teacher and self.teacher_generate else self.generate
        if not table:
            raise KeyError("no generation figures")
        sizes = sorted(int(b) for b in table)
        near = min(sizes, key=lambda b: abs(b - batch))
        g = table[str(near)]
        if len(sizes) > 1 and batch != near:  # interpolate / extrapolate decode time between the two probed sizes
            lo, hi = table[str(sizes[0])], table[str(sizes[-1])]
            slope = (hi.decode_step_s - lo.decode_step_s) / (sizes[-1] - sizes[0])
            return GenerateFigures(decode_step_s=max(lo.decode_step_s, lo.decode_step_s + slope * (batch - sizes[0])),
                                   prefill_token_s=g.prefill_token_s)
        return g


def machine() -> dict:
    """What makes two machines equally fast: CPU model, usable cores, torch threads and version, GPU name."""
    import torch

    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    out = {"cpu": cpu or platform.processor() or platform.machine(), "cores": cpu_threads(),
           "torch_threads": torch.get_num_threads(), "torch": torch.__version__}
    if torch.cuda.is_available():
        out["gpu"] = torch.cuda.get_device_name(0)
    return out


def probe_sizes(recipe) -> dict:
    """Probe sizes from the recipe: the largest micro-batch an enabled training stage runs (capped), a quarter of it,
    and the batch sizes of the teacher and of eval. Tiny test recipes probe tiny sizes."""
    tokens = [s.batch_size * s.max_length * (2 if name == "dpo" else 1)
              for name in ("dapt", "sft", "dpo") if getattr(recipe, name).enabled for s in [getattr(recipe, name)]]
    large = min(max(tokens, default=2 * BLOCK), 2 * BLOCK)  # larger steps follow linearly (per-token cost)
    block = min(BLOCK, recipe.dapt.max_length, large)
    large = max(2 * block, large // block * block)
    batches = sorted({recipe.generate.teacher.batch_size, recipe.eval.batch_size})
    return {"block": block, "small": block, "large": large, "batches": batches, "prompt": PROMPT_TOKENS}


def _timed(fn) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def measure_training(model_path: str, sizes: dict, precisions=("fp32", "bf16")) -> tuple[dict, str, float, float]:
    """({precision: StepFigures}, note, save_s, load_s) for the model at `model_path`."""
    import torch
    from transformers import AutoModelForCausalLM
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    from slmforge.models import device_defaults
    from slmforge.train.attention import attn_implementation

    dev = device_defaults()
    started = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32, attn_implementation=attn_implementation())
    model.to(dev["device"])
    load_s = time.perf_counter() - started
    model.train()
    model.config.use_cache = False
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-7, fused=dev["device"] == "cpu" or None)
    collate = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)
    gen = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size

    def batch(tokens: int) -> dict:
        blocks = [{"input_ids": torch.randint(10, vocab, (sizes["block"],), generator=gen).tolist()}
                  for _ in range(max(1, tokens // sizes["block"]))]
        return {k: (v.to(dev["device"]) if hasattr(v, "to") else v) for k, v in collate(blocks).items()}

    def step(inputs: dict, bf16: bool) -> None:
        with torch.autocast(dev["device"], dtype=torch.bfloat16, enabled=bf16):
            loss = model(**inputs).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def forward(inputs: dict, bf16: bool) -> None:
        with torch.no_grad(), torch.autocast(dev["device"], dtype=torch.bfloat16, enabled=bf16):
            model(**{k: v for k, v in inputs.items() if k != "labels"}, logits_to_keep=1)

    small, large = batch(sizes["small"]), batch(sizes["large"])
    n_small, n_large = small["input_ids"].shape[1], large["input_ids"].shape[1]
    out: dict[str, StepFigures] = {}
    note = ""
    for precision in precisions:
        bf16 = precision == "bf16"
        first = _timed(lambda: step(small, bf16))  # warm-up: kernels, allocator, optimizer state
        if bf16 and "fp32" in out and first > SLOWER_BF16 * max(out["fp32"].measured["warmup"], 1e-6):
            note = (f"bf16 autocast's first step took {first:.2f}s against fp32's {out['fp32'].measured['warmup']:.2f}s "
                    f"(over {SLOWER_BF16:g}x: emulated bf16); not measured further")
            break
        # the first step at each shape also builds its kernels (oneDNN primitives under bf16 autocast; on an AVX-512
        # BF16 EPYC a 512-token step took 3.03 s cold and 2.42 s warmed), so the large shape is warmed too before
        # either is timed; a slow machine (or a busy one) is measured once, as probes count against the budget
        step(large, bf16)
        reps = 2 if first < 3.0 else 1
        t_small = min(_timed(lambda: step(small, bf16)) for _ in range(reps))
        t_large = min(_timed(lambda: step(large, bf16)) for _ in range(reps))
        forward(large, bf16)
        t_forward = _timed(lambda: forward(large, bf16))
        token_s = max((t_large - t_small) / (n_large - n_small), t_large / n_large * 0.5)
        out[precision] = StepFigures(token_s=token_s, step_s=max(0.0, t_small - n_small * token_s),
                                     forward_token_s=t_forward / n_large,
                                     measured={"warmup": round(first, 4), f"step_{n_small}": round(t_small, 4),
                                               f"step_{n_large}": round(t_large, 4), f"forward_{n_large}": round(t_forward, 4)})
    with tempfile.TemporaryDirectory(dir=cache_root()) as tmp:  # a checkpoint as the Trainer writes one
        from safetensors.torch import save_file

        state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
        seen: set[int] = set()
        state = {k: v for k, v in state.items() if not (v.data_ptr() in seen or seen.add(v.data_ptr()))}  # tied weights
        save_s = _timed(lambda: (save_file(state, os.path.join(tmp, "model.safetensors")),
                                 torch.save(optimizer.state_dict(), os.path.join(tmp, "optimizer.pt"))))
    return out, note, save_s, load_s


def measure_generation(model_path: str, batches: list[int], prompt_tokens: int = PROMPT_TOKENS) -> dict[str, GenerateFigures]:
    """{batch size: GenerateFigures} of greedy batched decoding (KV cache on) at two lengths."""
    import torch

    from slmforge.models import load_causal_lm

    model = load_causal_lm(model_path)
    model.eval()
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(1)
    short, long_ = 2, 12
    out = {}
    for b in batches:
        ids = torch.randint(10, model.config.vocab_size, (b, prompt_tokens), generator=gen).to(device)

        def run(n: int) -> None:
            with torch.no_grad():
                model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                               do_sample=False, pad_token_id=0)
        run(short)  # warm-up
        t_short = _timed(lambda: run(short))
        t_long = _timed(lambda: run(long_))
        decode = max((t_long - t_short) / (long_ - short), 1e-6)
        out[str(b)] = GenerateFigures(decode_step_s=decode,
                                      prefill_token_s=max(t_short - short * decode, 0.0) / (b * prompt_tokens))
    return out


def faster_precision(train: dict[str, StepFigures], tokens: int, margin: float = 0.05) -> str:
    """bf16 when its step at `tokens` is at least `margin` faster than fp32's (fp32 is exact: a tie goes to it)."""
    if "bf16" not in train:
        return "fp32"
    cost = {p: f.step_s + tokens * f.token_s for p, f in train.items()}
    return "bf16" if "fp32" not in cost or cost["bf16"] < (1 - margin) * cost["fp32"] else "fp32"


BUSY_CONTENTION = 0.3


def run_queue_ns() -> tuple[int, int]:
    """(ns running, ns waiting for a core) summed over this process's threads; (0, 0) where Linux schedstat is absent."""
    run = wait = 0
    for stat in Path("/proc/self/task").glob("*/schedstat"):
        try:
            fields = stat.read_text().split()
            run, wait = run + int(fields[0]), wait + int(fields[1])
        except (OSError, ValueError, IndexError):  # a thread that ended meanwhile
            continue
    return run, wait


def was_busy(fig: "Figures", cores: int) -> bool:
    """Whether figures were timed on a busy machine: its load average over the cores, or the probes' threads waiting
    for a core over BUSY_CONTENTION of their runnable time (the 1-minute load average lags; the run queue does not)."""
    return fig.load > cores or fig.contention > BUSY_CONTENTION


def measured_busier(fig: "Figures", load: float, cores: int) -> bool:
    """Whether cached figures were timed on a busy machine that is quiet now (then they are measured again): other
    processes on a 2-core machine halve the step speed the probes see, and a plan sized on that spends half its budget.
    Quiet = 1-minute load under half the cores; while it is still busy, the cached figures stand (no probe every build)."""
    return was_busy(fig, cores) and load < cores / 2


def _cache_file(key: dict) -> Path:
    return cache_root() / "probes" / f"{hash_obj(key)[:24]}.json"


def figures(recipe, model_path: str, model_id: str, teacher_path: str | None, teacher_id: str | None,
            progress=None, generation: bool = True) -> Figures:
    """The probe figures for this machine, this model and these sizes: from the cache, else measured and cached.
    generation=False (settling `precision: auto` without a budget) times the training steps only."""
    sizes = probe_sizes(recipe)
    key = {"version": PROBE_VERSION, "machine": machine(), "model": model_id, "teacher": teacher_id or "", "sizes": sizes,
           "generation": generation}
    path = _cache_file(key)
    say = progress or (lambda msg: None)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    if path.is_file():
        try:
            cached = Figures.model_validate_json(path.read_text())
        except ValueError:
            cached = None  # a cache file from an interrupted write or older code: measure again
        if cached is not None and not measured_busier(cached, load, key["machine"]["cores"]):
            return cached.model_copy(update={"cached": True})
        if cached is not None:
            say(f"the cached probes were timed on a busy machine (load {cached.load:.1f}, run-queue wait "
                f"{cached.contention:.0%}); it is quiet now (load {load:.1f}): measuring again")
    started = time.perf_counter()
    say("timing training steps (fp32, then bf16 autocast) on the real model")
    run0, wait0 = run_queue_ns()
    train, note, save_s, load_s = measure_training(model_path, sizes)
    run1, wait1 = run_queue_ns()  # (threads torch started during the probes count from zero: their whole life)
    contention = (wait1 - wait0) / max(1, (run1 - run0) + (wait1 - wait0))
    generate = teacher_generate = {}
    if generation:
        say("timing batched generation")
        generate = measure_generation(model_path, sizes["batches"])
        teacher_generate = measure_generation(teacher_path, sizes["batches"]) if teacher_path else {}
    result = Figures(machine=key["machine"], model=model_id, train=train, bf16_note=note,
                     precision=faster_precision(train, sizes["large"]), save_s=save_s, load_s=load_s, generate=generate,
                     teacher_generate=teacher_generate, teacher=teacher_id or "", load=round(load, 2),
                     contention=round(contention, 3), probe_s=round(time.perf_counter() - started, 2))
    if was_busy(result, key["machine"]["cores"]):
        say(f"[yellow]the machine was busy while probing (load {load:.1f} on {key['machine']['cores']} cores, "
            f"run-queue wait {contention:.0%}): this build plans on slow figures; the next build on a quiet machine "
            f"measures again[/yellow]")
    try:
        atomic_write_json(path, result.model_dump(mode="json"))
    except OSError:  # a read-only cache only costs the next build the probes again
        pass
    return result
