"""Each benchmark as an lm-evaluation-harness task: a YAML file beside a local JSONL file, runnable offline with

    HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 lm_eval --model hf --model_args pretrained=MODEL --device cpu \
        --include_path runs/<name>/eval/lm_eval --tasks slmforge_<name>
    # data paths are relative to the task folder (../benchmarks/...): move runs/ anywhere, run from any directory
    # open-answer tasks asked in the model's chat format (eval.chat_template: auto/true) form a second group:
    ... --tasks slmforge_<name>_chat --apply_chat_template

The same folder is what `slmforge eval` itself runs, so our numbers are lm-eval's numbers.
"""

from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass, field, replace
from pathlib import Path

import yaml

from slmforge.generate.formats import SUMMARY_INSTRUCTION
from slmforge.run import atomic_write_text

METRICS_MODULE = "slmforge_metrics"  # metrics.py is copied under this name into every task folder


@dataclass(frozen=True)
class Spec:
    """How one benchmark kind is asked and scored."""

    output_type: str  # multiple_choice | generate_until | loglikelihood_rolling
    metrics: tuple[str, ...]  # the first is the headline
    binary: tuple[str, ...] = ()  # 0/1 metrics (Wilson CI); the rest get a bootstrap CI
    lower_is_better: tuple[str, ...] = ()
    template: str = ""
    process: str | None = None  # name of a process_* function in metrics.py
    until: tuple[str, ...] = ("\n",)
    description: str = ""
    chat_template: str = ""  # the user turn when asked in chat format (open-answer kinds only); "" = always plain
    extra: dict = field(default_factory=dict)


SPECS: dict[str, Spec] = {
    "mcq": Spec("multiple_choice", ("acc", "acc_norm"), binary=("acc", "acc_norm"), template="Question: {{prompt}}\nAnswer:",
                description="4-option questions on held-out documents, scored by log-likelihood (closed book)"),
    "cloze": Spec("generate_until", ("exact_match", "rouge_l"), binary=("exact_match",), template="{{prompt}}",
                  process="process_cloze", description="continue a held-out sentence; exact match on the missing words"),
    # small instruct models often open with a blank line: stopping at "\n\n" would cut every such answer to ""
    "qa": Spec("generate_until", ("token_f1", "rouge_l"), template="Question: {{prompt}}\nAnswer:", process="process_qa",
               until=("Question:", "\n\n\n"), description="open questions on held-out documents (closed book)",
               chat_template="{{prompt}}"),
    "summary": Spec("generate_until", ("rouge_l",), template="{{prompt}}\n\nSummary in one or two sentences:",
                    process="process_summary", until=("\n\n\n",), description="summarise a held-out passage",
                    chat_template=SUMMARY_INSTRUCTION + "\n\n{{prompt}}"),
    "domain_ppl": Spec("loglikelihood_rolling", ("word_perplexity", "bits_per_byte"),
                       lower_is_better=("word_perplexity", "bits_per_byte"), description="held-out domain documents"),
    "general_mcq": Spec("multiple_choice", ("acc", "acc_norm"), binary=("acc", "acc_norm"), template="Question: {{prompt}}\nAnswer:",
                        description="general knowledge (MMLU dev slice, MIT): forgetting check"),
    "general_ppl": Spec("loglikelihood_rolling", ("word_perplexity", "bits_per_byte"),
                        lower_is_better=("word_perplexity", "bits_per_byte"),
                        description="general explanatory text (MMLU explanations, MIT): forgetting check"),
    # scored by evaluate/questions.py on lm-eval's HFLM.loglikelihood, not exported as a task (lm-eval's acc_norm is the
    # per-character one; this row also normalises per token and reports the gold answer's perplexity)
    "questions": Spec("multiple_choice", ("acc_norm", "acc", "acc_norm_char", "answer_ppl"),
                      binary=("acc_norm", "acc", "acc_norm_char"), lower_is_better=("answer_ppl",),
                      template="Question: {{question}}\nAnswer:",
                      description="your questions (eval.questions), 4-way multiple choice, distractors = other items' "
                                  "answers (closed book)"),
    "doc_questions": Spec("multiple_choice", ("acc_norm", "acc", "acc_norm_char", "answer_ppl"),
                          binary=("acc_norm", "acc", "acc_norm_char"), lower_is_better=("answer_ppl",),
                          template="Question: {{question}}\nAnswer:",
                          description="questions the held-out documents ask or imply (question / how-to / FAQ / task "
                                      "headings), worded unlike any training template; multiple choice, closed book"),
}
# Open-book variants: the same items with the passages retrieval finds put before the question, in the layout RAFT
# trains on and serving uses (slmforge.index.bm25.format_passages)
OPEN_BOOK = {"mcq": "mcq_open", "qa": "qa_open", "questions": "questions_open", "doc_questions": "doc_questions_open"}
for _closed, _open in OPEN_BOOK.items():
    _s = SPECS[_closed]
    SPECS[_open] = replace(_s, template="{{passages}}\n\n" + _s.template,
                           chat_template="{{passages}}\n\nQuestion: " + _s.chat_template if _s.chat_template else "",
                           description=_s.description.replace("(closed book)", "").rstrip(", ") +
                           " (open book: retrieved passages before the question)")
GENERAL = ("general_mcq", "general_ppl")


def task_name(prefix: str, bench: str) -> str:
    return f"{prefix}_{bench}"


def safe_prefix(run_name: str) -> str:
    return "slmforge_" + re.sub(r"[^A-Za-z0-9_]", "_", run_name)


def asked_in_chat(bench: str, chat_template: bool | str, has_template: bool = True) -> bool:
    """auto: open-answer kinds (qa, summary) in the model's chat format, as an instruct model is used; cloze stays a
    plain continuation and log-likelihood kinds stay plain (lm-eval's convention for them)."""
    if not SPECS[bench].chat_template or not has_template:
        return False
    return chat_template is True or chat_template == "auto"


def relative_to_folder(data_file: Path, folder: Path) -> str:
    """The data file's path from the task folder (posix), so moving both together keeps the task working."""
    try:
        return Path(os.path.relpath(data_file.resolve(), folder.resolve())).as_posix()
    except ValueError:  # another drive (Windows): no relative path exists
        return str(data_file.resolve())


def task_config(name: str, bench: str, data_file: Path, max_gen_toks: int, chat: bool = False, folder: Path | None = None) -> str:
    """One task's YAML. With `folder` (where the YAML is written), the data path is relative to it and loaded by
    slmforge_metrics.load_local (lm-eval would resolve it against the working directory instead)."""
    spec = SPECS[bench]
    data_path = relative_to_folder(data_file, folder) if folder is not None else str(data_file.resolve())
    cfg: dict = {
        "task": name,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": data_path}},
        "test_split": "test",
        "output_type": spec.output_type,
    }
    if spec.output_type == "multiple_choice":
        cfg.update(doc_to_text=spec.template, doc_to_choice="{{choices}}", doc_to_target="{{answer_index}}")
        cfg["metric_list"] = [{"metric": m, "aggregation": "mean", "higher_is_better": True} for m in spec.metrics]
    elif spec.output_type == "generate_until":
        cfg.update(doc_to_text=spec.chat_template if chat else spec.template, doc_to_target="{{answer}}", target_delimiter=" ",
                   generation_kwargs={"until": list(spec.until), "max_gen_toks": max_gen_toks, "do_sample": False})
        cfg["metric_list"] = [{"metric": m, "aggregation": "mean", "higher_is_better": True} for m in spec.metrics]
    else:  # loglikelihood_rolling: the whole text is the target
        cfg.update(doc_to_text="", doc_to_target="{{text}}")
        cfg["metric_list"] = [{"metric": m} for m in spec.metrics]  # lm-eval's own (weighted) perplexity aggregations
    cfg["metadata"] = {"version": 1, "description": spec.description, "apply_chat_template": chat}
    text = yaml.safe_dump(cfg, sort_keys=False, allow_unicode=True, width=1000)
    if folder is not None:  # yaml.safe_dump cannot write lm-eval's `!function` tag
        text += f"custom_dataset: !function {METRICS_MODULE}.load_local\n"
    if spec.process:
        text += f"process_results: !function {METRICS_MODULE}.{spec.process}\n"
    return text


def write_tasks(folder: Path, prefix: str, data_files: dict[str, Path], max_gen_toks: dict[str, int],
                chat: set[str] = frozenset()) -> tuple[list[str], list[str]]:
    """One YAML per benchmark (+ group YAMLs and the metrics module) into `folder`: (plain task names, chat task names).

    Benchmarks in `chat` are written for lm-eval's --apply_chat_template and grouped as `<prefix>_chat`.
    """
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(Path(__file__).with_name("metrics.py"), folder / f"{METRICS_MODULE}.py")
    plain, chatted = [], []
    for bench, data_file in data_files.items():
        name = task_name(prefix, bench)
        text = task_config(name, bench, data_file, max_gen_toks.get(bench, 32), chat=bench in chat, folder=folder)
        atomic_write_text(folder / f"{bench}.yaml", text)
        (chatted if bench in chat else plain).append(name)
    for path, group, names in ((folder / "_group.yaml", prefix, plain), (folder / "_group_chat.yaml", f"{prefix}_chat", chatted)):
        if names:
            atomic_write_text(path, yaml.safe_dump({"group": group, "task": names, "aggregate_metric_list": []}, sort_keys=False))
        elif path.exists():
            path.unlink()
    return plain, chatted
