"""Questions the way users ask them, mined from the documents' own sentences by rules (no teacher needed).

Reading-comprehension mining in the manner of AdaptLLM: a sentence that states how to do something, what happens under a
condition, what a thing is used for, or what an option does already answers a user's question; the rule turns it into
that question, in two wordings (Physics of Language Models 3.1: many varied exposures of one fact), plus one reversed
form (answer -> question, 3.2's reversal). The sentence, with the one after it when it is short, is the answer.

    procedure   "To create a role, use CREATE ROLE."      -> "What is the procedure to create a role?",
                                                             "Explain the steps to create a role."
                                                   reversed: "Name the task this instruction accomplishes: use CREATE ROLE."
    condition   "If the table is locked, the command waits." -> "What happens if the table is locked?", ...
    purpose     "The pg_dump utility is used to back up a database." -> "What purpose does the pg_dump utility serve?", ...
    option      "-v, --verbose   Print every statement."   -> "Explain the -v, --verbose option.", ...

The wordings are training templates: evaluate/doc_questions.py's TRAINING_TEMPLATES lists them, so no benchmark item
built from held-out documents is asked in them (a gain on such items would prove the format, not the domain).
"""

from __future__ import annotations

import re

from slmforge.generate.extractive import make_id
from slmforge.index.bm25 import section_of
from slmforge.generate.text import sentences
from slmforge.records import Chunk, Item

# (rule, regex on one sentence, question wordings, reversed wording or None)
PROCEDURE = re.compile(r"^To (?P<goal>[a-z][^,;:]{8,90}), (?P<rest>[a-z].{8,})$")
CONDITION = re.compile(r"^(?P<word>If|When) (?P<cond>[a-z][^,;:]{8,90}), (?P<rest>.{8,})$")
PURPOSE = re.compile(r"^(?P<subj>(?:The |An? )?[`'\"A-Za-z][\w`'\".\- ]{1,50}?) (?:is|are) (?:mainly |primarily |typically )?used "
                     r"(?:to|for) (?P<rest>.{8,})$")
OPTION = re.compile(r"^\s*(?P<opt>--?[A-Za-z][\w-]*(?:[ =][A-Z_<>\[\]]+)?(?:,\s*--?[A-Za-z][\w-]*(?:[ =][A-Z_<>\[\]]+)?)*)"
                    r"(?:\s{2,}|\t+|\s*:\s+)(?P<desc>[A-Z].{10,})$")

WORDINGS = {
    "procedure": ("What is the procedure to {goal}?", "Explain the steps to {goal}."),
    "condition": ("What happens {word} {cond}?", "Describe the behaviour {word} {cond}."),
    "advice": ("What should I do {word} {cond}?", "Describe what to do {word} {cond}."),
    "purpose": ("What purpose does {subj} serve?", "Explain the purpose of {subj}."),
    "option": ("Explain the {opt} option.", "What effect does the {opt} option have?"),
}
REVERSED = {"procedure": "Name the task this instruction accomplishes: {rest}"}
# every fixed wording above, for the benchmarks' template check (evaluate/doc_questions.py)
TEMPLATES = ("What is the procedure to ", "Explain the steps to ", "What happens if ", "What happens when ",
             "Describe the behaviour ", "What should I do if ", "What should I do when ", "Describe what to do ", "What purpose does ", "Explain the purpose of ", "Explain the ",
             "What effect does the ", "Name the task this instruction accomplishes:")
_MAX_ANSWER_WORDS = 80


def _answer(sents: list[str], i: int) -> str:
    """The sentence, and the next one when the first is short (a procedure often continues)."""
    answer = sents[i]
    if len(answer.split()) < 14 and i + 1 < len(sents) and len((answer + " " + sents[i + 1]).split()) <= _MAX_ANSWER_WORDS:
        answer = f"{answer} {sents[i + 1]}"
    return answer


def _lower_first(s: str) -> str:
    return s[0].lower() + s[1:] if s[:1].isupper() and not s[1:2].isupper() else s


def _facts(chunk: Chunk) -> list[tuple[str, dict, str]]:
    """(rule, fields, answer) for each sentence or option line a rule matches."""
    out = []
    sents = sentences(chunk.text)
    for i, s in enumerate(sents):
        if len(s.split()) > _MAX_ANSWER_WORDS:
            continue
        for rule, pattern in (("procedure", PROCEDURE), ("condition", CONDITION), ("purpose", PURPOSE)):
            m = pattern.match(s)
            if m:
                fields = {k: v.strip().rstrip(".") for k, v in m.groupdict().items()}
                if rule == "condition":
                    fields["word"] = fields["word"].lower()
                    if re.match(r"you (should|can|must|need|may|have to)\b", fields["rest"]):  # advice to the reader
                        rule = "advice"
                        fields["cond"] = re.sub(r"\byour\b", "my", re.sub(r"\byou\b", "I", fields["cond"]))
                if rule == "purpose":
                    fields["subj"] = _lower_first(fields["subj"])
                out.append((rule, fields, _answer(sents, i)))
                break
    for line in chunk.text.splitlines():
        m = OPTION.match(line)
        if m and len(m["desc"].split()) <= _MAX_ANSWER_WORDS:
            out.append(("option", {"opt": m["opt"].strip(), "desc": m["desc"]}, m["desc"].strip()))
    return out


def user_question_groups(chunk: Chunk, per_chunk: int, wordings: int = 2, reversed_forms: bool = True) -> list[list[Item]]:
    """Up to `per_chunk` facts of one chunk; per fact, its question in `wordings` wordings (and reversed, where a rule
    has one). The wordings of one fact share its answer: a near-duplicate check runs on the first only."""
    base = dict(chunk_id=chunk.id, doc_id=chunk.doc_id, origin="extractive", context=chunk.text)
    section = section_of(chunk)
    groups: list[list[Item]] = []
    for rule, fields, answer in _facts(chunk)[:per_chunk]:
        group = []
        for template in WORDINGS[rule][:wordings]:
            prompt = template.format(**fields)
            if rule != "option" and section and section.lower() not in prompt.lower():
                prompt = f"{prompt[:-1]} ({section}){prompt[-1]}"  # the section disambiguates a generic goal
            group.append(Item(id=make_id(kind="qa", prompt=prompt, answer=answer), kind="qa", prompt=prompt,
                              answer=answer, **base))
        if reversed_forms and rule in REVERSED:
            prompt = REVERSED[rule].format(**fields)
            target = f"To {fields['goal']}."
            group.append(Item(id=make_id(kind="qa", prompt=prompt, answer=target), kind="qa", prompt=prompt,
                              answer=target, **base))
        groups.append(group)
    return groups


def user_question_items(chunk: Chunk, per_chunk: int, wordings: int = 2, reversed_forms: bool = True) -> list[Item]:
    return [it for group in user_question_groups(chunk, per_chunk, wordings, reversed_forms) for it in group]
