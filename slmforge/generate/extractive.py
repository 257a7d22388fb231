"""Deterministic generators: items copied from real sentences, correct by construction.

    cloze       a sentence cut before one of the corpus's terms; choices = that term + 3 other corpus terms
    mcq         the same sentence with the term blanked; "which term fills the blank?"
    qa          definition and function sentences -> a question the sentence answers, the sentence as the answer:
                "A binary string is a sequence of octets." -> "What is a binary string?"
                "The ON CONFLICT clause specifies an alternative action ..." -> "What does the ON CONFLICT clause specify?"
    summary     the passage's principal sentences (PEGASUS gap-sentence selection: highest ROUGE-1 F1 against the rest
                of the passage, kept in passage order) as an extractive one- or two-sentence summary
    preference  chosen = the real sentence; rejected = the sentence with its term swapped for another corpus term

Distractors are terms of the same shape (identifier, UPPERCASE keyword, word) that occur elsewhere in the corpus,
preferably in the same document, and never in the item's own chunk (so no distractor is also a right answer).
"""

from __future__ import annotations

import math
import random
import re
from collections import Counter, defaultdict

from slmforge.generate.text import ENGLISH_STOP_WORDS, content_words, cut_words, sentences
from slmforge.records import Chunk, Item
from slmforge.run import hash_obj

TERM = re.compile(r"\b[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)?\b")
DEFINITION = re.compile(
    r"^(?:The |A |An )?(?P<term>[A-Za-z_][\w\- ]{1,40}?) (?P<verb>is|are) (?P<rest>(?:a|an|the|one|used|defined) .{10,})$"
)
FUNCTION = re.compile(
    r"^(?P<term>(?:The |A |An )?[A-Za-z_][\w\-. ]{1,50}?) (?P<verb>returns|specifies|controls|determines|stores|allows|"
    r"creates|removes|defines|indicates|causes|prevents|provides|contains|represents|selects|enables|disables|"
    r"requires|converts) (?P<rest>.{10,})$"
)
SECTION_NUMBER = re.compile(r"^\s*(?:[A-Z]?\d+(?:\.\d+)*\.?|[IVX]+\.)\s+")
N_CHOICES = 4
_CLAUSE = {"that", "which", "who", "to", "when", "if", "where"}  # "an expression that returns ..." is not a subject
_NOT_A_SUBJECT = {"This", "That", "These", "Those", "It", "There", "Each", "All", "Such", "Which", "What", "Here", "One",
                  "If", "When", "Whether", "Although", "Because", "Since", "While", "Unless", "As", "In", "For", "Note", "So"}


def term_shape(term: str) -> str:
    """Distractors share the answer's shape, and for plain words its inflection, so grammar gives nothing away."""
    if "_" in term or "." in term or any(ch.isdigit() for ch in term):
        return "identifier"
    if term.isupper():
        return "upper"
    ending = next((e for e in ("ing", "ed", "ly", "s") if term.endswith(e) and not term.endswith("ss")), "")
    return ("capitalized" if term[:1].isupper() else "word") + ending


def make_id(**content) -> str:
    return hash_obj(content)[:16]


class TermIndex:
    """Candidate domain terms of a corpus with their document frequency over chunks."""

    def __init__(self, chunks: list[Chunk]):
        self.n = max(1, len(chunks))
        self.df: Counter = Counter()
        self.docs: dict[str, set[str]] = defaultdict(set)  # term -> doc ids it occurs in
        self.in_chunk: dict[str, set[str]] = {}
        # plain words count as terms only when some title or heading uses them ("Constraints", "Partitioning"):
        # that keeps everyday verbs and adjectives out of cloze gaps and distractor lists
        self.heading_words = {w.lower() for c in chunks for h in (c.title, *c.headings) for w in TERM.findall(h)}
        for c in chunks:
            terms = {t for t in TERM.findall(c.text) if self._candidate(t)}
            self.in_chunk[c.id] = {t.lower() for t in terms}
            for t in terms:
                self.df[t] += 1
                self.docs[t].add(c.doc_id)
        cap = max(3, int(0.25 * self.n))
        self.terms = {t for t, k in self.df.items() if 2 <= k <= cap or (self.n < 8 and k >= 1)}
        self.by_shape: dict[str, list[str]] = defaultdict(list)
        for t in sorted(self.terms):
            self.by_shape[term_shape(t)].append(t)

    def _candidate(self, t: str) -> bool:
        if len(t) < 3 or t.lower() in ENGLISH_STOP_WORDS or t.startswith("_") or t.endswith("_"):
            return False
        if "." in t and min(len(p) for p in t.split(".")) < 2:  # "i.e", "e.g"
            return False
        shape = term_shape(t)
        return shape in ("identifier", "upper") or (len(t) >= 5 and t.lower() in self.heading_words)

    def idf(self, term: str) -> float:
        return math.log(self.n / self.df.get(term, 1))

    def key_terms(self, sentence: str) -> list[str]:
        """Terms of a sentence, most specific first; word-shaped terms only when nothing more technical is there."""
        found = [t for t in dict.fromkeys(TERM.findall(sentence)) if t in self.terms]
        return sorted(found, key=lambda t: (term_shape(t) not in ("identifier", "upper"), -self.idf(t), t))

    def distractors(self, term: str, chunk: Chunk, rng: random.Random, k: int = N_CHOICES - 1) -> list[str]:
        banned = self.in_chunk.get(chunk.id, set()) | {term.lower()}
        pool = [t for t in self.by_shape[term_shape(term)] if t.lower() not in banned]
        same_doc = [t for t in pool if chunk.doc_id in self.docs[t]]
        other = [t for t in pool if chunk.doc_id not in self.docs[t]]
        rng.shuffle(same_doc)
        # closest in length first among the rest: "bytea" is a better foil for "jsonb" than for "pg_stat_statements"
        rng.shuffle(other)
        other.sort(key=lambda t: abs(len(t) - len(term)))
        out: list[str] = []
        for t in same_doc + other:
            if t.lower() not in {o.lower() for o in out}:
                out.append(t)
            if len(out) == k:
                break
        return out


def _blank(sentence: str, term: str) -> tuple[str, str] | None:
    """(text before the term, text after it) for the term's first whole-word occurrence after the third word."""
    for m in re.finditer(rf"(?<![\w.]){re.escape(term)}(?![\w])", sentence):
        before = sentence[: m.start()]
        if len(before.split()) >= 3:
            return before, sentence[m.end():]
    return None


def _choices(term: str, foils: list[str], rng: random.Random) -> tuple[list[str], int]:
    choices = [term, *foils]
    rng.shuffle(choices)
    return choices, choices.index(term)


def extractive_items(chunk: Chunk, kinds: list[str], terms: TermIndex, per_kind: int, seed: int,
                     passage_words: int = 150) -> list[Item]:
    """Up to `per_kind` items of each requested extractive kind from one chunk."""
    rng = random.Random(f"{seed}:{chunk.id}")
    base = dict(chunk_id=chunk.id, doc_id=chunk.doc_id, origin="extractive", context=chunk.text)
    sents = sentences(chunk.text)
    prev = {s: (sents[i - 1] if i else "") for i, s in enumerate(sents)}
    slots = []  # (sentence, term, before, after), one per sentence, in a seeded order
    for s in sents:
        for t in terms.key_terms(s)[:1]:
            cut = _blank(s, t)
            if cut:
                slots.append((s, t, *cut))
    rng.shuffle(slots)
    out: list[Item] = []
    used: set[str] = set()

    def take() -> list[tuple]:
        picked = [x for x in slots if x[0] not in used][:per_kind]
        used.update(x[0] for x in picked)
        return picked

    for kind in ("mcq", "cloze", "preference"):
        if kind not in kinds:
            continue
        for s, t, before, after in take():
            foils = terms.distractors(t, chunk, rng)
            if len(foils) < N_CHOICES - 1:
                continue
            if kind == "mcq":
                prompt = f"Which term fills the blank?\n\n{before}_____{after}"
                choices, idx = _choices(t, foils, rng)
                out.append(Item(id=make_id(kind=kind, prompt=prompt, choices=choices), kind=kind, prompt=prompt,
                                answer=t, choices=choices, answer_index=idx, **base))
            elif kind == "cloze":
                prompt = f"{prev[s]} {before}".strip()
                choices, idx = _choices(t, foils, rng)
                out.append(Item(id=make_id(kind=kind, prompt=prompt, answer=t), kind=kind, prompt=prompt.rstrip(),
                                answer=t, choices=choices, answer_index=idx, **base))
            else:
                prompt = f"Complete the sentence: {before.rstrip()} …"
                rejected = f"{before}{foils[0]}{after}"
                out.append(Item(id=make_id(kind=kind, prompt=prompt, answer=s, rejected=rejected), kind=kind,
                                prompt=prompt, answer=s, rejected=rejected, **base))
    if "qa" in kinds:
        out += question_items(chunk, sents, terms, per_kind, base)
    if "summary" in kinds:
        out += summary_items(chunk, base, passage_words)
    return out


def _verb_base(verb: str) -> str:
    """"specifies" -> "specify", "returns" -> "return" (enough for FUNCTION's verbs)."""
    return verb[:-3] + "y" if verb.endswith("ies") else verb[:-1]


def _everyday_word(word: str, terms: TermIndex) -> bool:
    """A capitalised everyday word that starts a sentence ("The", "A", "Use"), not a corpus term ("PostgreSQL")."""
    return word.isalpha() and word.istitle() and not terms.df.get(word) and (len(word) > 1 or word.lower() in ENGLISH_STOP_WORDS)


_GENERIC_HEADINGS = {"note", "notes", "tip", "warning", "caution", "important", "parameters", "description", "examples",
                     "example", "compatibility", "synopsis", "outputs", "overview", "introduction", "see also"}


def section_name(chunk: Chunk) -> str:
    """The innermost specific heading without its number ("5.4.1. Check Constraints" -> "Check Constraints");
    generic ones ("Parameters", "Note") give way to the page title ("DELETE")."""
    for h in reversed([*chunk.headings, chunk.title]):
        name = SECTION_NUMBER.sub("", h).strip()
        if name and name.lower() not in _GENERIC_HEADINGS:
            return name
    return SECTION_NUMBER.sub("", chunk.title).strip()


def question_items(chunk: Chunk, sents: list[str], terms: TermIndex, per_kind: int, base: dict) -> list[Item]:
    """Questions that a definition or function sentence answers; the whole sentence is the reference answer.

    A subject without a technical term ("the count", "the default") is ambiguous closed-book, so such a question
    names the section it comes from: "In “DELETE”, what is the count?".
    """
    out: list[Item] = []
    section = section_name(chunk)
    for s in sents:
        if len(out) >= per_kind or s.split()[0] in _NOT_A_SUBJECT:
            continue
        m = DEFINITION.match(s) or FUNCTION.match(s)
        if not m or len(m["term"].split()) > 6 or m["term"].rstrip().endswith((",", ".")) or _CLAUSE & set(m["term"].split()):
            continue
        subject = s[: m.start("verb")].strip()
        if _everyday_word(subject.split()[0], terms):
            subject = subject[0].lower() + subject[1:]  # "Use of ..." -> "use of ...", "The WITH clause" -> "the WITH clause"
        verb = m["verb"]
        question = f"what {verb} {subject}?" if verb in ("is", "are") else f"what does {subject} {_verb_base(verb)}?"
        specific = any(t in terms.terms for t in TERM.findall(subject))
        prompt = question[0].upper() + question[1:] if specific or not section else f"In “{section}”, {question}"
        out.append(Item(id=make_id(kind="qa", prompt=prompt, answer=s), kind="qa", prompt=prompt, answer=s, **base))
    return out


def _f1(a: set, b: set) -> float:
    common = len(a & b)
    return 2 * common / (len(a) + len(b)) if common else 0.0


def summary_items(chunk: Chunk, base: dict, max_words: int = 150, n_sentences: int = 2) -> list[Item]:
    """One extractive summary: the `n_sentences` principal sentences of the passage (the chunk's first max_words).

    Principal = highest ROUGE-1 F1 (on content words) against the rest of the passage, scored independently and
    kept in passage order: PEGASUS's "Ind-Orig" gap-sentence selection (Zhang et al., 2020). Written here because it
    is a dozen lines over our own sentence splitter; rouge_score would give the same ranking, slower.
    """
    passage = cut_words(chunk.text, max_words)
    sents = sentences(passage)
    if len(sents) < 2 * n_sentences:
        return []

    def score(i: int) -> float:  # ROUGE-1 F1 of the sentence against the passage without it
        return _f1(content_words(sents[i]), content_words(passage.replace(sents[i], " ")))

    ranked = sorted(range(len(sents)), key=lambda i: (-score(i), i))
    top = sorted(ranked[:n_sentences])
    summary = " ".join(sents[i] for i in top)
    if len(summary.split()) > 0.5 * len(passage.split()):
        return []
    return [Item(id=make_id(kind="summary", prompt=passage, answer=summary), kind="summary", prompt=passage,
                 answer=summary, **{**base, "context": passage})]
