"""Bring your own questions: a team's FAQ or support tickets (never trained on) scored as multiple choice.

    load_questions(path)      JSONL or CSV rows with `question`, `answer`, optional `section`, `id`, `source`
    mcq_items(questions)      4-way items whose distractors are other items' answers (same section first)
    score_mcq(model, tok, rows)  acc, acc_norm (per token), acc_norm_char (per character), gold-answer NLL per item
    references(rows)          what no model needs: chance, word overlap with the question, the longest option

Options are drawn per item from a seed and the item's id (never from the item's position), so an item's options are
the same in every run, in any order, and in any subset that still holds the items its distractors came from.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import random
import re
from pathlib import Path

from slmforge.evaluate.metrics import normalize_answer
from slmforge.records import Record

PROMPT = "Question: {question}\nAnswer:"  # the same wording as the mcq benchmarks (lm_eval_tasks.SPECS["mcq"])
FIELDS = ("id", "question", "answer", "section", "source")


class Question(Record):
    id: str
    question: str
    answer: str
    section: str = ""
    source: str = ""


class QuestionsError(ValueError):
    """A questions file that cannot be used; the message names the file, the line and the field."""


def question_id(question: str, answer: str) -> str:
    """Default id: a hash of the content, so it does not move when rows are reordered or removed."""
    return "q-" + hashlib.sha256(f"{question.strip()}\x00{answer.strip()}".encode()).hexdigest()[:12]


def _rows(path: Path):
    """(line number, dict) for each record of a JSONL or CSV file."""
    suffix = path.suffix.lower()
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        raise QuestionsError(f"{path}: not UTF-8 text ({err})") from None
    if suffix in (".jsonl", ".json", ".ndjson"):
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise QuestionsError(f"{path}:{lineno}: not valid JSON ({err.msg})") from None
            if not isinstance(row, dict):
                raise QuestionsError(f"{path}:{lineno}: expected a JSON object with 'question' and 'answer', "
                                     f"got {type(row).__name__}")
            yield lineno, row
    elif suffix in (".csv", ".tsv"):
        reader = csv.DictReader(text.splitlines(keepends=True), delimiter="\t" if suffix == ".tsv" else ",")
        header = reader.fieldnames or []
        for need in ("question", "answer"):
            if need not in header:
                raise QuestionsError(f"{path}:1: the header has no '{need}' column (columns: {', '.join(header) or 'none'})")
        for row in reader:
            if None in row:  # more cells than header columns
                raise QuestionsError(f"{path}:{reader.line_num}: more cells than the header's {len(header)} columns")
            yield reader.line_num, row
    else:
        raise QuestionsError(f"{path}: unknown questions format '{suffix}' (use .jsonl or .csv)")


def load_questions(path: str | Path) -> list[Question]:
    """Read and check a questions file. Columns other than id/question/answer/section/source are ignored."""
    path = Path(path)
    if not path.is_file():
        raise QuestionsError(f"{path}: questions file not found")
    out, seen = [], {}
    for lineno, row in _rows(path):
        values = {}
        for field in FIELDS:
            value = row.get(field)
            if value is None:
                value = ""
            if isinstance(value, (int, float)) and field in ("id", "section") and not isinstance(value, bool):
                value = str(value)
            if not isinstance(value, str):
                raise QuestionsError(f"{path}:{lineno}: field '{field}' must be text, got {type(value).__name__}")
            values[field] = " ".join(value.split()) if field != "id" else value.strip()
        for need in ("question", "answer"):
            if not values[need]:
                raise QuestionsError(f"{path}:{lineno}: field '{need}' is missing or empty")
        values["id"] = values["id"] or question_id(values["question"], values["answer"])
        values["source"] = values["source"] or f"{path.name}:{lineno}"
        if values["id"] in seen:
            raise QuestionsError(f"{path}:{lineno}: field 'id': '{values['id']}' already used on line {seen[values['id']]}"
                                 " (the same question and answer twice, or a repeated id)")
        seen[values["id"]] = lineno
        out.append(Question(**values))
    if not out:
        raise QuestionsError(f"{path}: no questions in the file")
    return out


# ------------------------------------------------------------------------------------------------ multiple choice
def cut_words(text: str, n: int) -> str:
    words = text.split()
    return " ".join(words[:n]) if n > 0 else " ".join(words)


def _priority(seed: int, item_id: str, option_key: str) -> str:
    """A per-(item, candidate) random rank: the same candidate ranks the same for this item in any subset."""
    return hashlib.sha256(f"{seed}\x00{item_id}\x00{option_key}".encode()).hexdigest()


def mcq_items(questions: list[Question], seed: int = 0, n_options: int = 4, option_words: int = 30) -> list[dict]:
    """[{id, question, choices, answer_index, section}]: distractors are other items' answers.

    Candidates are the other items' answers, cut to `option_words` words and deduplicated by their SQuAD-normalised
    text; one equal to the item's own (cut, normalised) answer is never used. Same-section candidates come first;
    within a group the order is a seeded hash of (seed, item id, candidate text), i.e. a random permutation fixed per
    item, which a subset or reordering of the questions cannot change. The gold's position is drawn from an RNG
    seeded by (seed, item id). Items get fewer options only when the whole set has too few distinct answers; an item
    with no distractor at all is an error.
    """
    if n_options < 2:
        raise ValueError(f"n_options must be at least 2, got {n_options}")
    cut = {q.id: cut_words(q.answer, option_words) for q in questions}
    pool: dict[str, tuple[str, set[str]]] = {}  # normalised option -> (option text, sections it answers)
    for q in sorted(questions, key=lambda q: q.id):
        key = normalize_answer(cut[q.id]) or cut[q.id].lower()
        text, sections = pool.setdefault(key, (cut[q.id], set()))
        sections.add(q.section)
    rows = []
    for q in questions:
        gold = cut[q.id]
        gold_key = normalize_answer(gold) or gold.lower()
        candidates = [(k, text, q.section in sections and bool(q.section)) for k, (text, sections) in pool.items() if k != gold_key]
        candidates.sort(key=lambda c: (not c[2], _priority(seed, q.id, c[0])))
        distractors = [text for _, text, _ in candidates[: n_options - 1]]
        if not distractors:
            raise ValueError(f"question {q.id} ({q.source}): no other distinct answer to use as a distractor")
        rng = random.Random(f"{seed}\x00{q.id}\x00gold")
        gold_at = rng.randrange(len(distractors) + 1)
        choices = distractors[:gold_at] + [gold] + distractors[gold_at:]
        rows.append({"id": q.id, "question": q.question, "choices": choices, "answer_index": gold_at, "section": q.section})
    return rows


def prompt_of(row: dict, context: str | None = None) -> str:
    text = PROMPT.format(question=row["question"])
    return f"{context.strip()}\n\n{text}" if context else text


def score_mcq(model, tokenizer, rows: list[dict], *, batch_size: int = 8, contexts: list[str] | None = None,
              prompts: list[str] | None = None) -> list[dict]:
    """Per item {id, acc, acc_norm, acc_norm_char, gold_nll, gold_tokens, pred_index, loglik}.

    The engine is lm-eval's HFLM.loglikelihood (the one the benchmark tasks run on); per-token normalisation divides
    by the tokens HFLM._encode_pair gives the option (the very split lm-eval scores: trailing context spaces move into
    the continuation, the whole string is tokenised, the context's own encoding is the prefix). With `contexts` (open
    book: ~400 tokens of passages before 4 short options) the sums come from `shared_prefix_loglik` instead: lm-eval
    runs the prompt once per option, this runs it once and reuses its KV cache for the options. Same tokens, same
    sums (a test compares the two engines item by item).
    acc_norm divides by the option's tokens; acc_norm_char by its characters (lm-eval's own acc_norm).
    `prompts`: whole prompts instead of `Question: …\nAnswer:` (e.g. a chat-templated prompt, as a server sends it);
    a prompt ending in a newline takes the option as it is, otherwise after a space.
    """
    from slmforge.evaluate.scoring import _quiet_lm_eval, offline_env

    offline_env()
    _quiet_lm_eval()
    from lm_eval.models.huggingface import HFLM

    for name, given in (("contexts", contexts), ("prompts", prompts)):
        if given is not None and len(given) != len(rows):
            raise ValueError(f"{name}: {len(given)} given for {len(rows)} items")
    from lm_eval.api.instance import Instance

    device = str(next(model.parameters()).device)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=device)
    long = contexts is not None or prompts is not None
    prompts = prompts or [prompt_of(row, contexts[i] if contexts else None) for i, row in enumerate(rows)]
    pairs = [[lm._encode_pair(p, option if p.endswith("\n") else f" {option}") for option in row["choices"]]
             for p, row in zip(prompts, rows)]
    if not long:  # short prompts: lm-eval's own batched engine
        requests = [Instance(request_type="loglikelihood", doc=row, arguments=(p, f" {o}"), idx=j)
                    for p, row in zip(prompts, rows) for j, o in enumerate(row["choices"])]
        flat = iter([float(r[0]) for r in lm.loglikelihood(requests, disable_tqdm=True)] if requests else [])
        logliks = [[next(flat) for _ in row["choices"]] for row in rows]
    else:  # a long shared prompt before short options: run it once
        logliks = [shared_prefix_loglik(model, item_pairs, max_length=lm.max_length) for item_pairs in pairs]
    out = []
    for row, item_pairs, lls in zip(rows, pairs, logliks):
        tokens = [len(cont) for _, cont in item_pairs]
        chars = [len(option) for option in row["choices"]]
        gold = row["answer_index"]
        argmax = lambda xs: max(range(len(xs)), key=xs.__getitem__)  # noqa: E731 - first maximum, as numpy's argmax
        pred = argmax(lls)
        pred_tok = argmax([ll / max(1, n) for ll, n in zip(lls, tokens)])
        pred_chr = argmax([ll / max(1, n) for ll, n in zip(lls, chars)])
        out.append({"id": row["id"], "acc": float(pred == gold), "acc_norm": float(pred_tok == gold),
                    "acc_norm_char": float(pred_chr == gold), "gold_nll": -lls[gold], "gold_tokens": tokens[gold],
                    "pred_index": pred, "loglik": lls})
    del lm
    return out


def shared_prefix_loglik(model, pairs: list[tuple[list[int], list[int]]], max_length: int = 8192) -> list[float]:
    """Summed log-probability of each continuation after its context, for pairs that share one context (the options
    of one question): the context runs once, its KV cache is repeated for the options, which run as one padded batch.
    Pairs with different contexts (a tokenizer that merged across the boundary) fall back to one forward each."""
    import inspect

    import torch

    contexts = {tuple(c) for c, _ in pairs}
    if len(contexts) != 1 or not all(cont for _, cont in pairs):
        return [_single_loglik(model, c, cont, max_length) for c, cont in pairs]
    context = list(pairs[0][0])
    conts = [cont for _, cont in pairs]
    longest = max(len(c) for c in conts)
    context = context[-max(1, max_length - longest):]  # left-truncate as lm-eval does
    device = next(model.parameters()).device
    # transformers 5.x names the KV cache `cache` (older releases: past_key_values); only the last position's logits
    # are needed from the context pass
    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    with torch.no_grad():
        first = model(input_ids=torch.tensor([context], device=device), use_cache=True, logits_to_keep=1)
        cache = getattr(first, name)
        head = torch.log_softmax(first.logits[0, -1].float(), -1)  # predicts each option's first token
        n, rest = len(conts), longest - 1
        total = [float(head[c[0]]) for c in conts]
        if rest:
            cache.batch_repeat_interleave(n)
            ids = torch.zeros((n, rest), dtype=torch.long, device=device)
            mask = torch.zeros((n, len(context) + rest), dtype=torch.long, device=device)
            mask[:, : len(context)] = 1
            for j, c in enumerate(conts):
                ids[j, : len(c) - 1] = torch.tensor(c[:-1])
                mask[j, len(context): len(context) + len(c) - 1] = 1
            positions = torch.arange(len(context), len(context) + rest, device=device).expand(n, -1)
            logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, **{name: cache}).logits
            logp = torch.log_softmax(logits.float(), -1)
            for j, c in enumerate(conts):
                if len(c) > 1:
                    target = torch.tensor(c[1:], device=device)
                    total[j] += float(logp[j, : len(c) - 1].gather(-1, target[:, None]).sum())
    return total


def _single_loglik(model, context: list[int], cont: list[int], max_length: int) -> float:
    import torch

    ids = (context + cont)[-(max_length + 1):][:-1]
    device = next(model.parameters()).device
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids], device=device)).logits[0]
    logp = torch.log_softmax(logits[-len(cont):].float(), -1)
    return float(logp.gather(-1, torch.tensor(cont, device=device)[:, None]).sum())


def answer_perplexity(scored: list[dict]) -> float:
    """Gold-answer perplexity given the question: exp(sum gold_nll / sum gold_tokens)."""
    tokens = sum(s["gold_tokens"] for s in scored)
    return math.exp(sum(s["gold_nll"] for s in scored) / tokens) if tokens else float("nan")


def item_nll(scored: list[dict]) -> list[float]:
    """Per-item gold-answer NLL per token: the per-item score behind the perplexity's paired comparison."""
    return [s["gold_nll"] / max(1, s["gold_tokens"]) for s in scored]


# ------------------------------------------------------------------------------------------------ no-model references
_STOP = frozenset("""a about above after again against all am an and any are as at be because been before being below
between both but by can could did do does doing down during each few for from further had has have having he her here
hers him his how i if in into is it its itself just me more most my no nor not now of off on once only or other our
out over own same she should so some such than that the their them then there these they this those through to too
under until up very was we were what when where which while who whom why will with would you your yours get got use
used using""".split())
_WORD = re.compile(r"\w+", re.UNICODE)


def content_words(text: str) -> set[str]:
    return {w for w in _WORD.findall(text.lower()) if w not in _STOP and (len(w) > 2 or w.isdigit())}


def references(rows: list[dict], seed: int = 0) -> dict:
    """{name: {"acc", "items", "description"}} for answers picked with no model at all.

    chance: acc is the expected accuracy (mean of 1/options); items are one seeded random guess per item (0/1), so
    the reference can be paired with a model like any other. word_overlap: the option sharing the most content words
    with the question. longest_option: the option with the most characters. Ties go to the first option (the gold's
    position is random, so that favours no answer).
    """
    def first_max(xs):
        return max(range(len(xs)), key=xs.__getitem__)

    picks = {"chance": [], "word_overlap": [], "longest_option": []}
    for row in rows:
        k = len(row["choices"])
        picks["chance"].append(random.Random(f"{seed}\x00{row['id']}\x00chance").randrange(k))
        q = content_words(row["question"])
        picks["word_overlap"].append(first_max([len(q & content_words(c)) for c in row["choices"]]))
        picks["longest_option"].append(first_max([len(c) for c in row["choices"]]))
    out = {}
    for name, chosen in picks.items():
        items = [float(p == row["answer_index"]) for p, row in zip(chosen, rows)]
        acc = sum(items) / len(items) if items else float("nan")
        out[name] = {"acc": acc, "items": items}
    if rows:
        out["chance"]["acc"] = sum(1 / len(r["choices"]) for r in rows) / len(rows)
    out["chance"]["description"] = "expected accuracy of a uniform guess (items: one seeded guess each)"
    out["word_overlap"]["description"] = "the option sharing the most content words with the question"
    out["longest_option"]["description"] = "the longest option"
    return out


# ------------------------------------------------------------------------------------------------ decontamination
def questions_input(recipe) -> dict:
    """{"questions": sha256 of eval.questions} when set: part of the cache key of every stage that reads them."""
    from slmforge.run import sha256_file

    path = recipe.eval.questions
    if path is None:
        return {}
    if not Path(path).is_file():
        raise QuestionsError(f"eval.questions: {path}: questions file not found")
    return {"questions": sha256_file(Path(path))}


class QuestionGuard:
    """Word n-grams of every question and answer (generate.verify's held-out n-gram test, same n): a training row
    sharing one of them is dropped, and `hit` says which question it came close to."""

    def __init__(self, questions: list[Question], n: int):
        from slmforge.generate.text import ngrams

        self.n, self._ngrams = n, ngrams
        self.owner: dict[tuple, str] = {}
        for q in questions:
            for text in (q.question, q.answer):
                for g in ngrams(text, n):
                    self.owner.setdefault(g, q.id)

    def hit(self, texts) -> str | None:
        for text in texts:
            for g in self._ngrams(text, self.n):
                if g in self.owner:
                    return self.owner[g]
        return None


def drop_question_overlap(recipe, items: list, pretrain: list[dict]) -> tuple[list, list[dict], list[dict], dict]:
    """Training items and pretraining rows sharing a `generate.verify.heldout_ngram`-word n-gram with any of
    eval.questions are removed: (kept items, kept pretrain rows, rejected rows, summary for the generate report)."""
    if recipe.eval.questions is None:
        return items, pretrain, [], {}
    from slmforge.generate.verify import item_texts

    questions = load_questions(recipe.eval.questions)
    guard = QuestionGuard(questions, recipe.generate.verify.heldout_ngram)
    rejected, kept_items, kept_rows, hit = [], [], [], set()
    for item in items:
        qid = guard.hit(item_texts(item))
        if qid is None:
            kept_items.append(item)
        else:
            hit.add(qid)
            rejected.append({"kind": item.kind, "chunk_id": item.chunk_id, "origin": item.origin, "reason": "question_overlap",
                             "detail": f"shares a {guard.n}-word n-gram with question {qid}",
                             "item": item.model_dump(mode="json", exclude={"context"})})
    for row in pretrain:
        qid = guard.hit([row["text"]])
        if qid is None:
            kept_rows.append(row)
        else:
            hit.add(qid)
            rejected.append({"kind": row["kind"], "chunk_id": row["chunk_id"], "origin": row["teacher"], "reason": "question_overlap",
                             "detail": f"pretrain row shares a {guard.n}-word n-gram with question {qid}"})
    summary = {"file": str(recipe.eval.questions), "questions": len(questions), "ngram": guard.n,
               "items_removed": len(items) - len(kept_items), "pretrain_rows_removed": len(pretrain) - len(kept_rows),
               "questions_hit": len(hit), "examples": rejected[:5]}
    return kept_items, kept_rows, rejected, summary


def training_index(artifacts: dict[str, Path], n: int):
    """Word n-grams of every training file (evaluate/decontaminate.py's index)."""
    from slmforge.evaluate.decontaminate import NgramIndex

    index = NgramIndex(n)
    for label, path in artifacts.items():
        index.add_jsonl(path, label)
    return index


def training_overlap(questions: list[Question], index) -> tuple[dict, dict[str, float]]:
    """How much of each question+answer occurs in the training files (the documents too: curate/train.jsonl is what
    DAPT reads verbatim, and generate cannot remove a document): ({"ngram", "indexed", "overlapping", "max",
    "examples"}, {question id: share of its n-grams seen in training})."""
    shares = {q.id: index.overlap(f"{q.question} {q.answer}") or 0.0 for q in questions}
    hit = sorted(((s, q) for q in questions if (s := shares[q.id])), key=lambda t: -t[0])
    return ({"ngram": index.n, "indexed": index.sources, "overlapping": len(hit), "max": round(hit[0][0], 4) if hit else 0.0,
             "examples": [{"id": q.id, "question": q.question[:160], "overlap": round(s, 4)} for s, q in hit[:5]]}, shares)
