"""Bring-your-own questions: loading, seeded distractors, no-model references, and paired verdicts on a real model."""

import json

import pytest

from slmforge.evaluate.metrics import normalize_answer
from slmforge.evaluate.paired import BEATS, TIE, paired_diff
from slmforge.evaluate.questions import (Question, QuestionsError, answer_perplexity, item_nll, load_questions, mcq_items,
                                         references, score_mcq)


def _questions(n=40, sections=4):
    return [Question(id=f"q{i:03d}", question=f"How does feature {i} behave under load {i % 7}?",
                     answer=f"Feature {i} answer text number {i} with detail {i * 3} and more words here.",
                     section=f"s{i % sections}") for i in range(n)]


def test_distractors_never_include_the_items_own_answer():
    qs = _questions()
    # answers equal after normalisation (case, punctuation, articles) to q000's own answer must never be its distractor
    qs += [Question(id="dup1", question="Another question?", answer="FEATURE 0 answer text number 0, with detail 0 and more words here!"),
           Question(id="dup2", question="Yet another?", answer="The feature 0 answer text number 0 with detail 0 and more words here.")]
    answers = {q.id: q.answer for q in qs}
    for row in mcq_items(qs, seed=3):
        own = {normalize_answer(answers[row["id"]])}
        assert len(row["choices"]) == 4
        gold = row["choices"][row["answer_index"]]
        distractors = [c for i, c in enumerate(row["choices"]) if i != row["answer_index"]]
        assert normalize_answer(gold) in own
        assert not any(normalize_answer(d) in own for d in distractors), row
        assert len({normalize_answer(c) for c in row["choices"]}) == 4  # no option twice


def test_same_section_distractors_come_first_and_options_are_cut():
    qs = _questions(40, sections=4)
    long = Question(id="long", question="What is long?", answer=" ".join(f"w{i}" for i in range(100)), section="s1")
    rows = {r["id"]: r for r in mcq_items(qs + [long], option_words=12)}
    by_answer = {" ".join(q.answer.split()[:12]): q.section for q in qs + [long]}
    for r in rows.values():
        assert all(len(c.split()) <= 12 for c in r["choices"])
        sec = next(q.section for q in qs + [long] if q.id == r["id"])
        assert all(by_answer[c] == sec for c in r["choices"])  # 10 items per section: enough same-section answers
    assert rows["long"]["choices"][rows["long"]["answer_index"]] == " ".join(f"w{i}" for i in range(12))


def test_options_are_stable_across_runs_order_and_subsets():
    qs = _questions(40)
    full = {r["id"]: r for r in mcq_items(qs, seed=7)}
    assert {r["id"]: r for r in mcq_items(list(reversed(qs)), seed=7)} == full
    assert mcq_items(qs, seed=7) == mcq_items(qs, seed=7)
    # a subset keeping an item and the items its distractors came from gives that item the same options and gold slot
    source = {" ".join(q.answer.split()[:30]): q for q in qs}
    for qid in ("q005", "q017", "q031"):
        keep = {source[c].id for c in full[qid]["choices"]}
        subset = [q for q in qs if q.id in keep or int(q.id[1:]) % 3 == 0]
        assert {r["id"]: r for r in mcq_items(subset, seed=7)}[qid] == full[qid]
    # the gold position is spread, and another seed draws other options
    assert len({r["answer_index"] for r in full.values()}) == 4
    assert mcq_items(qs, seed=8) != mcq_items(qs, seed=7)


def test_load_questions_jsonl_csv_and_errors(tmp_path):
    good = tmp_path / "faq.jsonl"
    good.write_text(json.dumps({"question": "How do I reset it?", "answer": "Hold the button.", "section": "Basics"}) + "\n\n"
                    + json.dumps({"id": "x2", "question": "Why?", "answer": "Because.", "extra": 1}) + "\n")
    qs = load_questions(good)
    assert [q.section for q in qs] == ["Basics", ""] and qs[1].id == "x2" and qs[0].id.startswith("q-")
    assert qs[0].source == "faq.jsonl:1" and load_questions(good)[0].id == qs[0].id  # content hash, stable
    csv_path = tmp_path / "faq.csv"
    csv_path.write_text('question,answer,section\n"How, exactly?","Like ""this"".",A\nWhat?,That.,\n')
    assert [(q.question, q.answer, q.section) for q in load_questions(csv_path)] == [("How, exactly?", 'Like "this".', "A"),
                                                                                    ("What?", "That.", "")]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": "Q?", "answer": "A."}) + "\n" + json.dumps({"question": "Q2?"}) + "\n")
    with pytest.raises(QuestionsError, match=r"bad\.jsonl:2: field 'answer' is missing"):
        load_questions(bad)
    bad.write_text(json.dumps({"question": "Q?", "answer": ["A."]}) + "\n")
    with pytest.raises(QuestionsError, match=r"bad\.jsonl:1: field 'answer' must be text"):
        load_questions(bad)
    bad.write_text("{not json\n")
    with pytest.raises(QuestionsError, match=r"bad\.jsonl:1: not valid JSON"):
        load_questions(bad)
    bad_csv = tmp_path / "bad.csv"
    bad_csv.write_text("question,reply\nQ?,A.\n")
    with pytest.raises(QuestionsError, match=r"bad\.csv:1: the header has no 'answer' column"):
        load_questions(bad_csv)
    bad_csv.write_text("question,answer\nQ?,A.\nQ?,A.\n")
    with pytest.raises(QuestionsError, match=r"bad\.csv:3: field 'id'.*line 2"):
        load_questions(bad_csv)


def test_references_pick_what_they_say():
    rows = [{"id": "a", "question": "Which port does the proxy daemon use?", "answer_index": 2,
             "choices": ["Restart it.", "A much longer option that says nothing useful at all here", "The proxy daemon uses port 80.", "No."]},
            {"id": "b", "question": "How big is the cache?", "answer_index": 0,
             "choices": ["It is four megabytes by default.", "Blue.", "Only on Tuesdays.", "Ask the cache admin later"]}]
    ref = references(rows)
    assert ref["word_overlap"]["items"] == [1.0, 0.0]  # b: 'cache' is only in a wrong option
    assert ref["longest_option"]["items"] == [0.0, 1.0] and ref["longest_option"]["acc"] == 0.5
    assert ref["chance"]["acc"] == 0.25 and set(ref["chance"]["items"]) <= {0.0, 1.0} and len(ref["chance"]["items"]) == 2
    assert references(rows)["chance"]["items"] == ref["chance"]["items"]


# Made-up facts the base model cannot know, whose answers share no word with their questions: closed book the model
# is near chance (acc_norm 5 of 12 with SmolLM2-135M), open book it copies (12 of 12), so the verdict can flip.
FACTS = [
    ("What port does the Zorbex daemon listen on?", "Number 7431, unless an environment override exists."),
    ("Where does Quillmark keep its journal files?", "Under /var/lib/qm/wal, in sixteen megabyte segments."),
    ("How do I rotate the Fennic signing key?", "Run keys rotate with a two day grace, then restart workers."),
    ("What does the Brastle planner do with stale statistics?", "It falls back to nested loops and logs warning BR-204."),
    ("Why does Tovik refuse to start after an upgrade?", "Its catalog version differs until the migration tool has run."),
    ("How large can a Murrel bucket grow?", "Nine hundred objects; the next write opens a sibling."),
    ("Which user runs the Plexan scheduler?", "An unprivileged account named plexsched, created at install time."),
    ("What happens when the Goswin cache is full?", "The least recently compiled template is evicted with notice GC-11."),
    ("How do I make Orrin replicas read-only?", "Set replica_mode to locked in the config and send SIGHUP."),
    ("What is the default timeout of a Vessik request?", "Ninety-five seconds, then two retries."),
    ("Who may approve a Dunmore change window?", "Only an on-call lead holding the approver badge."),
    ("When does Halvic compact old shards?", "Every Sunday at 03:00 UTC, one shard at a time."),
]


@pytest.fixture(scope="module")
def small_model():
    from slmforge.models import load_causal_lm, load_tokenizer

    return load_causal_lm("default", device="cpu").eval(), load_tokenizer("default")


def test_real_model_base_vs_itself_and_vs_open_book(small_model):
    model, tok = small_model
    qs = [Question(id=f"f{i}", question=q, answer=a) for i, (q, a) in enumerate(FACTS)]
    rows = mcq_items(qs, seed=0)
    closed = score_mcq(model, tok, rows, batch_size=8)
    again = score_mcq(model, tok, list(reversed(rows)), batch_size=3)[::-1]
    flat = lambda scored: [ll for s in scored for ll in s["loglik"]]  # noqa: E731
    assert flat(again) == pytest.approx(flat(closed), abs=1e-3)  # batching and order do not change a score
    for s, r in zip(closed, rows):
        assert s["id"] == r["id"] and len(s["loglik"]) == 4 and s["gold_tokens"] > 3 and s["gold_nll"] > 0
        assert s["acc"] == float(s["pred_index"] == r["answer_index"])
    # the base against itself: no difference, on every metric
    for metric in ("acc", "acc_norm", "acc_norm_char"):
        assert paired_diff([s[metric] for s in closed], [s[metric] for s in again], binary=True)["verdict"] == TIE
    assert paired_diff(item_nll(closed), item_nll(again), higher_is_better=False)["verdict"] == TIE
    # "trained on the answers", simulated honestly: the same model with each gold answer in its context
    book = score_mcq(model, tok, rows, contexts=[q.answer for q in qs])
    assert sum(s["acc_norm"] for s in book) == len(rows) > sum(s["acc_norm"] for s in closed)
    assert paired_diff([s["acc_norm"] for s in closed], [s["acc_norm"] for s in book], binary=True)["verdict"] == BEATS
    assert paired_diff(item_nll(closed), item_nll(book), higher_is_better=False)["verdict"] == BEATS
    assert answer_perplexity(book) < answer_perplexity(closed)


def test_a_model_trained_on_the_answers_beats_its_base(small_model):
    """The verdict flips when the knowledge is in the weights: a copy of the base, fine-tuned for a few steps on the
    question-answer pairs (as `Question: q\\nAnswer: a`, the scored format), BEATS the base on the same items."""
    import copy

    import torch

    base, tok = small_model
    qs = [Question(id=f"f{i}", question=q, answer=a) for i, (q, a) in enumerate(FACTS)]
    rows = mcq_items(qs, seed=0)
    before = score_mcq(base, tok, rows)
    trained = copy.deepcopy(base).train()
    batch = tok([f"Question: {q.question}\nAnswer: {q.answer}{tok.eos_token}" for q in qs], return_tensors="pt", padding=True)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    optimizer = torch.optim.AdamW(trained.parameters(), lr=1e-4)
    torch.manual_seed(0)
    for _ in range(12):
        optimizer.zero_grad()
        trained(**batch, labels=labels).loss.backward()
        optimizer.step()
    after = score_mcq(trained.eval(), tok, rows)
    acc = paired_diff([s["acc_norm"] for s in before], [s["acc_norm"] for s in after], binary=True)
    assert acc["verdict"] == BEATS, acc
    assert paired_diff(item_nll(before), item_nll(after), higher_is_better=False)["verdict"] == BEATS


def test_the_shared_prefix_engine_gives_lm_evals_loglikelihoods(small_model):
    """score_mcq runs each prompt once and reuses its KV cache for the options; lm-eval's HFLM.loglikelihood runs every
    (prompt, option) pair whole. Same tokens, same sums: closed book and open book (a long passage before the question)."""
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    from slmforge.evaluate.questions import prompt_of

    model, tok = small_model
    rows = mcq_items([Question(id=f"f{i}", question=q, answer=a) for i, (q, a) in enumerate(FACTS)], seed=0)
    passage = "Passages:\n[1] [manual.html § Facts] " + " ".join(a for _, a in FACTS)
    for contexts in (None, [passage] * len(rows)):
        ours = [ll for s in score_mcq(model, tok, rows, contexts=contexts) for ll in s["loglik"]]
        lm = HFLM(pretrained=model, tokenizer=tok, batch_size=4, device="cpu")
        requests = [Instance(request_type="loglikelihood", doc=r, idx=j,
                             arguments=(prompt_of(r, contexts[i] if contexts else None), f" {option}"))
                    for i, r in enumerate(rows) for j, option in enumerate(r["choices"])]
        theirs = [float(x[0]) for x in lm.loglikelihood(requests, disable_tqdm=True)]
        assert ours == pytest.approx(theirs, abs=2e-3)


def test_whole_prompts_score_as_given_chat_template_included(small_model):
    """`prompts` replaces `Question: …\\nAnswer:`: the same prompt text gives the same scores as the contexts path, and a
    chat-templated prompt (as a server sends it) scores each option as the start of the assistant's reply, no space."""
    from slmforge.evaluate.questions import prompt_of

    model, tok = small_model
    rows = mcq_items([Question(id=f"f{i}", question=q, answer=a) for i, (q, a) in enumerate(FACTS)], seed=0)
    passage = "Passages:\n[1] [manual.html § Facts] " + " ".join(a for _, a in FACTS)
    by_context = score_mcq(model, tok, rows, contexts=[passage] * len(rows))
    by_prompt = score_mcq(model, tok, rows, prompts=[prompt_of(r, passage) for r in rows])
    assert [s["loglik"] for s in by_prompt] == [s["loglik"] for s in by_context]
    gold = {q: a for q, a in FACTS}  # each question's own answer as its passage: read, it gives the answer away
    chat = [tok.apply_chat_template([{"role": "user", "content": f"Passages:\n[1] [manual.html § Facts] "
                                      f"{gold[r['question']]}\n\nQuestion: {r['question']}"}],
                                    add_generation_prompt=True, tokenize=False) for r in rows]
    served = score_mcq(model, tok, rows, prompts=chat)
    assert chat[0].endswith("\n") and all(len(s["loglik"]) == 4 for s in served)
    assert sum(s["acc_norm"] for s in served) == len(rows)
    with pytest.raises(ValueError, match="prompts: 1 given"):
        score_mcq(model, tok, rows, prompts=chat[:1])
