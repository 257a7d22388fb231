"""Real-question-style items from the held-out documents, worded unlike any training template.

The training drills (generate/extractive.py, generate/formats.py, generate/user_questions.py, generate/raft.py) ask "Which term fills the blank?", "Complete the
sentence: …", "What is/are X?", "What does X <verb>?", "In “<section>”, …" and summarise passages; a benchmark in
those words rewards learning the format. These items come from the documents' own structure instead, by rules no
generator uses:

    asked      a heading that is a question ("Why is my index not used?")
    how_to     a "How to …" / "How do I …" / "How can I …" heading, asked as "How do I …?"
    faq        in a FAQ or troubleshooting section: a short paragraph ending in "?" and the paragraph after it
    task       a heading that names a task with a gerund ("Creating a Table") asked as "How do I create a table?"
               (the verb's base form must occur in the documents, else the heading is skipped)

The answer is the section's first prose paragraph (the paragraph after the question for `faq`). Items whose
question starts with or contains a training template's wording are dropped, as are answers that only point
elsewhere ("See Section 5.4."). They are scored exactly as your own questions (evaluate/questions.py): multiple
choice whose distractors are other items' answers, same document first.
"""

from __future__ import annotations

import re
from collections import Counter

from slmforge.evaluate.questions import Question, question_id
from slmforge.generate.formats import SUMMARY_INSTRUCTION
from slmforge.generate.raft import NO_SOURCE
from slmforge.generate.user_questions import TEMPLATES as USER_QUESTION_TEMPLATES
from slmforge.records import Document

# Every fixed wording the training-data generators and formats put into prompts (generate/extractive.py,
# generate/formats.py, generate/writers.py); tests check both directions against real generated items.
TRAINING_TEMPLATES = (
    "Which term fills the blank?", "Complete the sentence:", "Complete the text with the missing term:", "Complete:",
    "What is ", "What are ", "What does ", "In “", SUMMARY_INSTRUCTION, "Summary of “", "Summary in one or two sentences",
    "Write one question", "Write one multiple-choice question", "Passage:",
    *USER_QUESTION_TEMPLATES, "Passages:", NO_SOURCE,
)
RULES = {
    "asked": "a heading that is itself a question",
    "how_to": "a 'How to …' / 'How do I …' heading, asked as 'How do I …?'",
    "faq": "a question paragraph in a FAQ or troubleshooting section, answered by the paragraph after it",
    "task": "a gerund heading ('Creating a Table') asked as 'How do I create a table?'",
}
# the wording each rule itself writes (the `asked` and `faq` rules copy the documents' own questions)
OWN_PREFIXES = ("How do I ",)

SECTION_NUMBER = re.compile(r"^\s*(?:[A-Z]?\d+(?:\.\d+)*\.?|[IVX]+\.)\s+")
FAQ_HEADING = re.compile(r"\b(faqs?|frequently asked|troubleshoot\w*|common (problems|questions|issues)|q\s*&\s*a)\b", re.I)
HOW_TO = re.compile(r"^how\s+(?:to|do\s+i|can\s+i|do\s+you|can\s+you)\s+(?P<rest>.+?)\??$", re.I)
GERUND = re.compile(r"^(?P<verb>[A-Z][a-z]+ing)\s+(?!(?:and|or|of|vs|versus|as|is)\b)(?P<rest>\S.*)$")
POINTER = re.compile(r"^(see|refer to|for (more )?(details|information)|this (section|chapter) (describes|explains|covers))\b", re.I)
_WORD = re.compile(r"[A-Za-z]+")


def clean_heading(h: str) -> str:
    return " ".join(SECTION_NUMBER.sub("", h).split()).strip()


def paragraphs(text: str) -> list[str]:
    return [" ".join(p.split()) for p in re.split(r"\n\s*\n", text) if p.strip()]


def prose(p: str, min_words: int = 8) -> bool:
    """A sentence-like paragraph, not code, a table row, a list of names or a heading."""
    words = p.split()
    if len(words) < min_words or p.startswith(("```", "    ", "|", "$ ", "#")):
        return False
    letters = sum(c.isalpha() for c in p)
    return letters > 0.6 * len(p.replace(" ", "")) and p.rstrip()[-1:] in ".!:)\"'”"


def answer_of(section_text: str, max_words: int) -> str | None:
    for p in paragraphs(section_text):
        if prose(p):
            if POINTER.match(p):
                return None  # the section only points elsewhere
            if not (p[0].isupper() or p[0].isdigit()):
                return None  # continues a code block or list the section opened with: no standalone answer
            words = p.split()
            return " ".join(words[:max_words])
    return None


def base_verb(gerund: str, vocabulary: set[str]) -> str | None:
    """'Creating' -> 'create', 'Running' -> 'run', 'Using' -> 'use': the first candidate the documents use as a word."""
    stem = gerund[:-3].lower()
    candidates = [stem, stem + "e"]
    if len(stem) > 3 and stem[-1] == stem[-2] and stem[-1] not in "lsz":  # "runn" -> "run", not "add" -> "ad"
        candidates.append(stem[:-1])
    for c in candidates:
        if c in vocabulary and len(c) > 2:  # "us" is a word, "use" is the verb
            return c
    return None


def shares_template(question: str) -> str | None:
    """The training template this wording starts with or contains, if any (case-insensitive)."""
    low = question.lower()
    for t in TRAINING_TEMPLATES:
        if low.startswith(t.lower()) or t.strip().lower() in low:
            return t
    return None


def sentence_case(text: str) -> str:
    """Title Case heading words lowered, names kept: 'Configure the XML Type' -> 'configure the XML type'."""
    return " ".join(w if any(c.isupper() or c.isdigit() for c in w[1:]) or w.isupper() else w.lower() for w in text.split())


def _question(text: str) -> str:
    text = " ".join(text.split()).rstrip(" .:")
    return text if text.endswith("?") else text + "?"


def document_questions(documents: list[Document], max_answer_words: int = 60) -> tuple[list[Question], dict]:
    """(questions, {"by_rule": Counter, "dropped": {reason: n}, "examples_dropped": [...]}) from held-out documents.
    Each question's section is its document id (distractors come from the same document first)."""
    vocabulary = {w.lower() for d in documents for w in _WORD.findall(d.text)}
    out: list[Question] = []
    dropped: Counter = Counter()
    examples: list[dict] = []
    seen: set[str] = set()

    def add(rule: str, question: str, answer: str | None, doc: Document, where: str) -> None:
        if not answer:
            dropped["no prose answer (or it only points elsewhere)"] += 1
            return
        template = shares_template(question)
        if template:
            dropped["wording shared with a training template"] += 1
            if len(examples) < 5:
                examples.append({"question": question, "template": template})
            return
        key = question.lower()
        if key in seen:
            dropped["duplicate question"] += 1
            return
        seen.add(key)
        out.append(Question(id=question_id(question, answer), question=question, answer=answer, section=doc.id,
                            source=f"{doc.source} § {where} [{rule}]"))

    for doc in documents:
        for s in doc.sections:
            heads = [clean_heading(h) for h in s.headings if clean_heading(h)]
            heading = heads[-1] if heads else ""
            in_faq = bool(FAQ_HEADING.search(" ".join(heads + [doc.title])))
            if in_faq:  # question paragraphs and the paragraph answering each
                paras = paragraphs(s.text)
                for p, nxt in zip(paras, paras[1:]):
                    if p.endswith("?") and 3 <= len(p.split()) <= 40 and prose(nxt, 5) and not nxt.endswith("?"):
                        add("faq", _question(p), answer_of(nxt, max_answer_words), doc, heading or doc.title)
            if not heading:
                continue
            how = HOW_TO.match(heading)
            if how:
                add("how_to", _question(f"How do I {sentence_case(how['rest'])}"), answer_of(s.text, max_answer_words), doc, heading)
            elif heading.endswith("?") and len(heading.split()) >= 3:
                add("asked", _question(heading), answer_of(s.text, max_answer_words), doc, heading)
            elif not in_faq and (g := GERUND.match(heading)):
                verb = base_verb(g["verb"], vocabulary)
                rest = g["rest"]
                if verb is None:
                    dropped["gerund heading without a known base verb"] += 1
                    continue
                add("task", _question(f"How do I {verb} {sentence_case(rest)}"), answer_of(s.text, max_answer_words), doc, heading)
    by_rule = Counter(q.source.rsplit("[", 1)[-1].rstrip("]") for q in out)
    return out, {"by_rule": dict(by_rule), "dropped": dict(dropped), "examples_dropped": examples}


def spread(questions: list[Question], budget: int, seed: int) -> list[Question]:
    """Up to `budget` questions, round-robin over documents in a seeded order, so one long page cannot dominate."""
    import random

    by_doc: dict[str, list[Question]] = {}
    for q in sorted(questions, key=lambda q: (q.section, q.id)):
        by_doc.setdefault(q.section, []).append(q)
    queues = [by_doc[d] for d in sorted(by_doc)]
    random.Random(seed).shuffle(queues)
    picked: list[Question] = []
    while len(picked) < budget and any(queues):
        for queue in queues:
            if queue and len(picked) < budget:
                picked.append(queue.pop(0))
    return sorted(picked, key=lambda q: (q.section, q.id))


def built_text(summary: dict, n: int) -> str:
    rules = "; ".join(f"{k}: {RULES[k]} ({summary['by_rule'].get(k, 0)})" for k in RULES)
    dropped = ", ".join(f"{v} {k}" for k, v in summary["dropped"].items()) or "none"
    return (f"{n} questions the held-out documents ask or imply, by rules no training generator uses ({rules}); answer = "
            f"the section's first prose paragraph; dropped: {dropped}. Disjoint from every training template "
            f"({', '.join(repr(t.strip()) for t in TRAINING_TEMPLATES)}): no item starts with or contains one. "
            "Scored as multiple choice among other items' answers (same document first), closed book.")
