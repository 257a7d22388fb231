"""Questions the held-out documents ask themselves: the rules, and disjointness from every training template."""

from slmforge.evaluate.doc_questions import OWN_PREFIXES, TRAINING_TEMPLATES, document_questions, shares_template
from slmforge.records import Document, Section

ANSWER = "The planner estimates the cost of each plan and picks the cheapest one for the query at hand."


def _doc(sections, title="Guide"):
    return Document(id="guide", source="guide.md", format="md", sha256="0", title=title,
                    sections=[Section(headings=h, text=t) for h, t in sections])


def test_rules_turn_headings_and_faq_paragraphs_into_questions():
    doc = _doc([
        (["Guide", "Why is my index not used?"], ANSWER),
        (["Guide", "How to Configure Logging"], "Logging is configured in the main settings file, one parameter per line."),
        (["Guide", "5.2. Creating a Table"], "You create a table by naming it and listing its columns with their types."),
        (["Guide", "Adding a Column"], "To add a column, use the ALTER TABLE command with its ADD COLUMN form."),
        (["Guide", "Using XML Values"], "Values of the XML type are checked for well-formedness when they are stored."),
        (["Guide", "Handling of Quotation Marks"], "Quotation marks inside a function body must be doubled in the source."),
        (["Guide", "What is a view?"], "A view is a stored query that can be referenced like a table in other queries."),
        (["Guide", "Where are the logs written?"], "See Section 5.4."),
        (["Guide", "Troubleshooting"], "Why does the server refuse connections?\n\nThe server listens only on localhost "
                                        "until listen_addresses is changed.\n\nA plain paragraph that asks nothing."),
    ])
    qs, summary = document_questions([doc])
    got = {q.question: (q.answer, q.source.rsplit("[", 1)[-1].rstrip("]")) for q in qs}
    assert got["Why is my index not used?"] == (ANSWER, "asked")
    assert got["How do I configure logging?"][1] == "how_to"
    assert got["How do I create a table?"][1] == "task" and got["How do I add a column?"][1] == "task"
    assert got["How do I use XML values?"][1] == "task"  # "Using" -> "use" (found in the text), acronyms kept
    assert got["Why does the server refuse connections?"][1] == "faq"
    assert got["Why does the server refuse connections?"][0].startswith("The server listens only on localhost")
    assert not any("handle of" in q.lower() for q in got)  # "Handling of …" is no task
    assert "What is a view?" not in got and summary["dropped"]["wording shared with a training template"] == 1
    assert "Where are the logs written?" not in got  # the answer only points elsewhere
    assert all(q.section == "guide" for q in qs) and summary["by_rule"]["task"] == 3


def test_benchmark_wording_is_disjoint_from_every_training_template():
    """Both directions, against real generated training items of the demo corpus: no benchmark question starts with
    or contains a training template, and no training prompt starts with a wording the benchmark's rules write, nor
    shares its first three words with any benchmark question."""
    from pathlib import Path

    from conftest import DEMO_DOCS, demo_curate
    from slmforge.generate import make_items
    from slmforge.generate.formats import SUMMARY_INSTRUCTION, pretrain_rows, sft_rows
    from slmforge.ingest.readers import ReadError, read_file
    from slmforge.recipe import GenerateConfig
    from slmforge.records import Chunk
    from slmforge.run import read_jsonl

    docs = []
    for path in sorted(Path(DEMO_DOCS).rglob("*.html")):
        try:
            docs.append(read_file(path, DEMO_DOCS))
        except ReadError:
            pass
    qs, summary = document_questions(docs)
    assert len(qs) >= 30, summary  # the PostgreSQL pages ask plenty ("Creating a Table", "Adding a Column", …)
    for q in qs:
        assert shares_template(q.question) is None, q
        assert not any(t.strip().lower() in q.question.lower() for t in TRAINING_TEMPLATES)

    train = read_jsonl(demo_curate() / "train.jsonl", Chunk)[:150]
    items, _ = make_items(train, ["mcq", "cloze", "qa", "summary"], GenerateConfig(), cache_dir=Path(demo_curate()).parent / "dq-cache", seed=0)
    chunks = {c.id: c for c in train}
    prompts = [i.prompt for i in items]
    prompts += [m["content"] for r in sft_rows(items) for m in r["messages"] if m["role"] == "user"]
    prompts += [r["text"] for r in pretrain_rows(items, chunks)]
    assert len(prompts) > 100 and {i.kind for i in items} >= {"mcq", "cloze", "qa"}
    first3 = lambda text: tuple(text.lower().split()[:3])  # noqa: E731
    bench_heads = {first3(q.question) for q in qs}
    for p in prompts:
        assert not p.startswith(OWN_PREFIXES), p
        assert first3(p) not in bench_heads, p
    # and every fixed wording in TRAINING_TEMPLATES is one the generators really write (the list is not made up)
    seen = [t for t in TRAINING_TEMPLATES if any(t.strip() in p for p in prompts)]
    assert {"Which term fills the blank?", "What is ", "What does ", "In “", "Complete the text with the missing term:",
            SUMMARY_INSTRUCTION} <= set(seen), seen
