"""Rebuild general_mcq.jsonl and general_text.jsonl (the forgetting check) from the MMLU dev examples that the
lm-evaluation-harness wheel ships (lm_eval/tasks/mmlu/flan_cot_fewshot/_cot_prompts.json; MMLU: MIT, Hendrycks et
al. 2021; lm-eval: MIT). Run once by a maintainer; the outputs are committed, nothing is fetched at run time.

    python slmforge/evaluate/data/make_general.py
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import re
from pathlib import Path

# General-knowledge subjects for the MCQ set; the explanations of *other* subjects become the general text.
MCQ_SUBJECTS = ("high_school_geography", "high_school_biology", "nutrition", "miscellaneous", "global_facts",
                "marketing", "human_aging", "high_school_psychology", "sociology", "prehistory", "astronomy",
                "conceptual_physics")
TEXT_SUBJECTS = ("world_religions", "us_foreign_policy", "public_relations", "high_school_world_history",
                 "high_school_european_history", "management", "human_sexuality", "philosophy", "security_studies",
                 "high_school_macroeconomics", "anatomy", "virology", "high_school_government_and_politics",
                 "international_law", "jurisprudence", "moral_disputes", "clinical_knowledge", "medical_genetics",
                 "high_school_statistics", "electrical_engineering")
QA = re.compile(r"Q: (?P<q>.*?)\n(?P<opts>\(A\).*?)\nA: Let's think step by step\.(?P<why>.*?)The answer is \((?P<a>[A-D])\)", re.S)
OPTS = re.compile(r"\(([A-D])\)\s*(.*?)\s*(?=\([A-D]\)|$)", re.S)
REFER = re.compile(r"^\s*We refer to [^.]*? for help\.\s*")


def main() -> None:
    spec = importlib.util.find_spec("lm_eval")
    src = Path(spec.submodule_search_locations[0]) / "tasks/mmlu/flan_cot_fewshot/_cot_prompts.json"
    prompts = json.loads(src.read_text())
    here = Path(__file__).parent
    mcq, text = [], []
    for subject in MCQ_SUBJECTS:
        for m in QA.finditer(prompts[subject]):
            opts = dict(OPTS.findall(m["opts"]))
            if sorted(opts) != ["A", "B", "C", "D"] or len(m["q"]) > 400:
                continue
            choices = [opts[k].rstrip(".").strip() for k in "ABCD"]
            question = m["q"].strip()
            mcq.append({"id": hashlib.sha256(question.encode()).hexdigest()[:16], "subject": subject,
                        "question": question, "choices": choices, "answer_index": "ABCD".index(m["a"])})
    for subject in TEXT_SUBJECTS:
        for m in QA.finditer(prompts[subject]):
            why = REFER.sub("", m["why"]).strip()
            if len(why.split()) >= 25:
                text.append({"id": hashlib.sha256(why.encode()).hexdigest()[:16], "subject": subject, "text": why})
    for name, rows in (("general_mcq.jsonl", mcq), ("general_text.jsonl", text)):
        (here / name).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
        print(name, len(rows))


if __name__ == "__main__":
    main()
