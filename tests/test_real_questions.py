"""bench/real_questions.py: FAQ parsing per format, drop rules, the FAQ kept out of the corpus, the recipe it builds.

Small inline samples shaped like each real FAQ page (R-FAQ.html from makeinfo, the Debian FAQ from DocBook XSL,
SQLite's faq.html, git's gitfaq.txt); no network; the general-text perplexity on the tiny test model.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from tests.test_train import real_model_dir, tiny_model  # noqa: F401 (fixtures)

BENCH = Path(__file__).resolve().parents[1] / "bench"


def _load(name: str):
    if name in sys.modules:
        return sys.modules[name]
    sys.path.insert(0, str(BENCH))
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


faq = _load("faq_parsing")

TEXINFO = """<html><head><title>R FAQ</title></head><body>
<h1 class="settitle">R FAQ</h1>
<div class="header"><p>Next: <a href="#Introduction">Introduction</a>, Up: <a href="#dir">(dir)</a></p></div>
<h1 class="top">R FAQ</h1>
<h2 class="contents-heading">Table of Contents</h2>
<div class="contents"><ul><li><a href="#Introduction">1 Introduction</a></li></ul></div>
<h2 class="chapter">1 Introduction</h2>
<p>This document contains answers to some of the most frequently asked questions about R.</p>
<h3 class="section">1.1 Legalese</h3>
<p>This document is free software; you can redistribute it and/or modify it.</p>
<h2 class="chapter">2 R Basics</h2>
<ul class="section-toc"><li><a href="#What-is-R_003f">What is R?</a></li></ul>
<div class="section" id="What-is-R_003f">
<div class="header"><p>Next: <a href="#b">What machines does R run on?</a>, Previous: <a href="#a">R Basics</a></p></div>
<h3 class="section">2.1 What is R?</h3>
<p>R is a system for statistical computation and graphics. It consists of
a language plus a run-time environment with graphics.</p>
<p>R has a home page at <a href="https://www.R-project.org/">https://www.R-project.org/</a>.</p>
</div>
<div class="section"><h3 class="section">2.2 How can R be installed?</h3>
<div class="subsection"><h4 class="subsection">2.2.1 How can R be installed (Unix-like)</h4>
<p>If R is already installed, it can be started by typing <code>R</code> at the shell prompt.</p>
<pre class="example">$ R --vanilla</pre>
</div></div>
<div class="section"><h3 class="section">2.3 What is CRAN?</h3>
<p>See <a href="#CRAN">What is CRAN?</a>.</p></div>
<div class="section"><h3 class="section">2.4 What is R?</h3>
<p>A repeated question, with a different answer of several words.</p></div>
</body></html>"""


def test_texinfo_faq_items_sections_and_drops():
    kept, dropped = faq.screen(faq.texinfo_html(TEXINFO, "R-FAQ.html"))
    assert [k["question"] for k in kept] == ["What is R?", "How can R be installed (Unix-like)"]
    what_is_r = kept[0]
    assert what_is_r["section"] == "R Basics" and what_is_r["source"] == "R-FAQ.html"
    assert what_is_r["answer"].startswith("R is a system for statistical computation")
    assert "https://www.R-project.org/" in what_is_r["answer"]
    assert "$ R --vanilla" in kept[1]["answer"]  # code blocks stay in the answer
    for item in kept:  # navigation bars and menus never leak into answers
        assert "Next:" not in item["answer"] and "Previous:" not in item["answer"]
    assert [(d["question"], d["reason"]) for d in dropped] == [
        ("Introduction", "not a question"), ("Legalese", "not a question"), ("R Basics", "not a question"),
        ("How can R be installed?", "empty answer"),  # its text is all in its subsection
        ("What is CRAN?", "points elsewhere"), ("What is R?", "duplicate question")]


DOCBOOK = """<?xml version="1.0" encoding="UTF-8"?><html xmlns="http://www.w3.org/1999/xhtml"><head>
<title>Chapter 1. Definitions and overview</title></head><body>
<div class="navheader"><table><tr><th>Chapter 1. Definitions and overview</th></tr>
<tr><td><a href="index.en.html">Prev</a></td><td><a href="getting-debian.en.html">Next</a></td></tr></table></div>
<div class="chapter"><div class="titlepage"><div><div><h1 class="title"><a id="basic-defs"></a>Chapter 1. Definitions and overview</h1></div></div></div>
<div class="toc"><p><strong>Table of Contents</strong></p><dl class="toc"><dt><span class="section">
<a href="#whatisfaq">1.1. What is this FAQ?</a></span></dt></dl></div>
<div class="section"><div class="titlepage"><div><div><h2 class="title"><a id="whatisfaq"></a>1.1. What is this FAQ?</h2></div></div></div>
<p>This document gives frequently asked questions (with their answers!) about the Debian distribution.</p></div>
<div class="section"><div class="titlepage"><div><div><h2 class="title"><a id="linux"></a>1.2. OK, now I know what Debian is... what is Linux?!</h2></div></div></div>
<p>In short, Linux is the kernel of a Unix-like operating system.</p></div>
<div class="section"><div class="titlepage"><div><div><h2 class="title"><a id="tools"></a>1.3. What tools does Debian provide?</h2></div></div></div>
<p>Debian provides several programs to manage packages.</p>
<div class="section"><div class="titlepage"><div><div><h3 class="title"><a id="dpkg"></a>1.3.1. dpkg</h3></div></div></div>
<p>This is the main package management program.</p></div></div>
<div class="section"><div class="titlepage"><div><div><h2 class="title"><a id="where"></a>1.4. Where is the installation manual?</h2></div></div></div>
<p><a href="https://www.debian.org/releases/stable/installmanual">https://www.debian.org/releases/stable/installmanual</a></p></div>
</div>
<div class="navfooter"><table><tr><td>Prev</td><td>Up</td><td>Next</td></tr></table></div>
</body></html>"""


def test_docbook_faq_numbering_stripped_navigation_dropped():
    kept, dropped = faq.screen(faq.docbook_html(DOCBOOK, "basic-defs.en.html"))
    assert [k["question"] for k in kept] == ["What is this FAQ?", "OK, now I know what Debian is... what is Linux?!",
                                             "What tools does Debian provide?"]
    assert {k["section"] for k in kept} == {"Definitions and overview"}  # "Chapter 1." removed
    assert kept[2]["answer"] == "Debian provides several programs to manage packages."  # not its subsection's text
    assert all("Prev" not in k["answer"] and "Table of Contents" not in k["answer"] for k in kept)
    assert {d["question"]: d["reason"] for d in dropped} == {
        "Definitions and overview": "not a question", "dpkg": "not a question",
        "Where is the installation manual?": "points elsewhere"}


SQLITE = """<html><body><div class=nosearch><a href="index.html">Home</a> Menu About Documentation</div>
<h1 align="center">Frequently Asked Questions</h1>
<ol><li value='1'><a href="#q1">How do I create an AUTOINCREMENT field?</a></li></ol>
<a name="q1"></a>
<p><b>(1) How do I create an AUTOINCREMENT field?</b></p>
<blockquote><p>Short answer: A column declared <a href="lang_createtable.html#rowid">INTEGER PRIMARY KEY</a> will
  autoincrement.</p>
<blockquote><pre>
CREATE TABLE t1(a INTEGER PRIMARY KEY, b INTEGER);
</pre></blockquote></blockquote></li>
<a name="q3"></a>
<p><b>(3) SQLite lets me insert a string into a database column of type integer!</b></p>
<blockquote><p>This is a feature, not a bug.  SQLite uses <a href="datatype3.html">dynamic typing</a>.</p></blockquote></li>
<a name="q8"></a>
<p><b>(8) Are there any known size limits to SQLite databases?</b></p>
<blockquote><p>See <a href="limits.html">limits.html</a> for a full discussion of
  the limits of SQLite.</p></blockquote></li>
</body></html>"""


def test_sqlite_faq_bold_questions_blockquote_answers():
    items = faq.sqlite_faq(SQLITE, "faq.html")
    assert [i["source"] for i in items] == ["faq.html#q1", "faq.html#q3", "faq.html#q8"]
    kept, dropped = faq.screen(items, require_question=False)
    assert [k["question"] for k in kept] == ["How do I create an AUTOINCREMENT field?",
                                             "SQLite lets me insert a string into a database column of type integer!"]
    assert kept[0]["answer"].startswith("Short answer: A column declared INTEGER PRIMARY KEY will autoincrement.")
    assert "CREATE TABLE t1(a INTEGER PRIMARY KEY, b INTEGER);" in kept[0]["answer"]
    assert "Home" not in kept[0]["answer"]
    assert [(d["source"], d["reason"]) for d in dropped] == [("faq.html#q8", "points elsewhere")]
    # a heading-style screen would drop the statement-style entry: the flag is what keeps it
    assert [d["reason"] for d in faq.screen(items)[1]] == ["not a question", "points elsewhere"]


GITFAQ = """gitfaq(7)
=========

NAME
----
gitfaq - Frequently asked questions about using Git

Configuration
-------------

[[user-name]]
What should I put in `user.name`?::
\tYou should put your personal name, generally a form using a given name
\tand family name.
+
This configuration doesn't have any effect on authenticating to remote services;
for that, see `credential.username` in linkgit:git-config[1].

[[configure-editor]]
How do I configure a different editor?::
\tSet the `core.editor` configuration value, for example:
+
----
$ git config --global core.editor nano
----

Common Issues
-------------

[[windows-diff-control-m]]
I'm on Windows and git diff shows my files as having a `^M` at the end.::
\tBy default, Git expects files to be stored with Unix line endings.

[[elsewhere]]
How do I write good commit messages?::
\tSee linkgit:gitworkflows[7].

SEE ALSO
--------
linkgit:git-config[1]
"""


def test_asciidoc_faq_items_markup_removed():
    items = faq.asciidoc_faq(GITFAQ, "gitfaq.txt")
    kept, dropped = faq.screen(items, require_question=False)
    assert [(k["section"], k["source"]) for k in kept] == [
        ("Configuration", "gitfaq.txt#user-name"), ("Configuration", "gitfaq.txt#configure-editor"),
        ("Common Issues", "gitfaq.txt#windows-diff-control-m")]
    first = kept[0]
    assert first["question"] == "What should I put in `user.name`?"
    assert first["answer"] == ("You should put your personal name, generally a form using a given name\nand family name."
                               "\n\nThis configuration doesn't have any effect on authenticating to remote services;\n"
                               "for that, see credential.username in git-config(1).")
    assert kept[1]["answer"].endswith("$ git config --global core.editor nano")  # code kept, fences gone
    assert "SEE ALSO" not in kept[2]["answer"] and "linkgit" not in kept[2]["answer"]
    assert [(d["source"], d["reason"]) for d in dropped] == [("gitfaq.txt#elsewhere", "points elsewhere")]


@pytest.mark.parametrize("answer, expected", [
    ("See section 5.", True),
    ("Please see the Debian Reference for this.", True),
    ("https://cran.r-project.org/doc/FAQ/", True),
    ("Doug Bates has kindly provided an extensive response in a post to the r-help list, which can be reviewed at "
     "https://stat.ethz.ch/pipermail/r-help/2006-May/094765.html.", True),
    ("S-PLUS is a value-added version of S sold by TIBCO Software Inc. See https://en.wikipedia.org/wiki/S-PLUS "
     "for more information.", False),  # it answers first, then points
    ("To list all the files of the installed package foo, run dpkg --listfiles foo.", False),
    ("Use single-quotes, not double-quotes, around string literals in SQL; see the SQL standard for the rule, which "
     "SQLite follows when an identifier of that name does not exist in the table you query.", False),
])
def test_points_elsewhere(answer, expected):
    assert faq.points_elsewhere(answer) is expected


rq = _load("real_questions")


def test_corpus_never_holds_the_faq(tmp_path):
    pkg = tmp_path / "pkg" / "usr/share/R/doc/manual"
    pkg.mkdir(parents=True)
    (pkg / "R-intro.html").write_text("<html><body><h1>An Introduction to R</h1><p>text</p></body></html>")
    (pkg / "R-FAQ.html").write_text(TEXINFO)
    domain = rq.DOMAINS["r"]
    corpus = tmp_path / "corpus"
    counts = rq.build_corpus(domain, tmp_path / "pkg", [pkg / "R-FAQ.html"], corpus)
    assert counts["files"] == 1 and sorted(p.name for p in corpus.rglob("*.html")) == ["R-intro.html"]
    # a copy under another name is caught by its content, the FAQ's own name by the hold-out pattern
    (corpus / "copy.html").write_text(TEXINFO)
    with pytest.raises(RuntimeError, match="copy of the FAQ"):
        rq.assert_no_faq(corpus, [pkg / "R-FAQ.html"], domain.holdout)
    (corpus / "copy.html").unlink()
    (corpus / "R-FAQ-2.html").write_text("other bytes")
    with pytest.raises(RuntimeError, match="never be trained on"):
        rq.assert_no_faq(corpus, [pkg / "R-FAQ.html"], domain.holdout)


def test_recipe_is_the_init_starter_with_training_enabled(tmp_path):
    from slmforge.recipe import STARTER, load_recipe

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    recipe_path = rq.write_recipe(rq.DOMAINS["debian"], corpus, tmp_path)
    text = recipe_path.read_text()
    assert text.startswith(STARTER.format(name="real-debian", documents=corpus))  # what `slmforge init` writes
    recipe = load_recipe(recipe_path, overrides=list(rq.BUILD_OVERRIDES))
    assert recipe.preset == "demo" and recipe.documents == corpus
    assert recipe.enabled_stages() == ["ingest", "curate", "index", "generate", "dapt", "sft", "dpo"]


def test_compare_pairs_items_and_reports_the_result_keys():
    from slmforge.evaluate.questions import Question, mcq_items

    questions = [Question(id=f"q{i}", question=f"How do I configure option{i}?", answer=f"Set option{i} in the file {i}.",
                          section="s") for i in range(40)]
    rows = mcq_items(questions, seed=0)

    def scored(right: set[int], nll: float):
        return [{"id": r["id"], "acc": float(i in right), "acc_norm": float(i in right), "acc_norm_char": 0.0,
                 "gold_nll": nll * 10, "gold_tokens": 10, "pred_index": 0} for i, r in enumerate(rows)]

    base = scored(set(range(10)), 3.0)
    same = rq.compare(rows, base, base)
    assert same["acc_norm_diff"] == 0 and same["acc_norm_verdict"] == "not distinguishable"
    better = rq.compare(rows, base, scored(set(range(40)), 2.0))
    assert better["acc_norm_base"] == 0.25 and better["acc_norm_specialist"] == 1.0
    assert better["acc_norm_verdict"] == "BEATS" and better["acc_norm_diff_ci95"][0] > 0
    assert better["answer_nll_verdict"] == "BEATS"  # lower NLL on every item
    assert abs(better["answer_ppl_base"] - 2.718281828 ** 3) < 1e-6
    assert better["lexical_reference"] == 1.0  # "option{i}" is in both the question and only its own answer
    assert set(rq.RESULT_KEYS) - {"build_s"} - set(rq.general_perplexity([[1.0, 1, 1]], [[1.0, 1, 1]])) <= set(better)


def test_general_perplexity_change_and_interval():
    import math

    base = [[2.0 * w, w, w + 1] for w in range(5, 25)]  # 2 nats per word on every paragraph
    same = rq.general_perplexity(base, base)
    assert abs(same["general_ppl_base"] - math.exp(2.0)) < 1e-9
    assert same["general_ppl_change_pct"] == 0.0 and same["general_ppl_change_pct_ci95"] == [0.0, 0.0]
    worse = rq.general_perplexity(base, [[nll + 0.1 * w, w, t] for nll, w, t in base])  # +0.1 nats per word
    assert abs(worse["general_ppl_change_pct"] - 100 * (math.exp(0.1) - 1)) < 1e-9
    lo, hi = worse["general_ppl_change_pct_ci95"]
    assert 0 < lo <= worse["general_ppl_change_pct"] <= hi
    mixed = rq.general_perplexity(base, [[nll + (0.3 if i % 2 else -0.3) * w, w, t] for i, (nll, w, t) in enumerate(base)])
    lo, hi = mixed["general_ppl_change_pct_ci95"]
    assert lo < 0 < hi  # half the paragraphs better, half worse: not a change the interval can tell


def test_general_text_nll_is_the_models_own_loss_and_is_cached(tmp_path, tiny_model):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    rows = rq.general_text_nll(str(tiny_model), tmp_path)
    texts = [line for line in rq.GENERAL_TEXT.read_text(encoding="utf-8").splitlines() if line.strip()]
    assert len(rows) == len(texts) == 52
    tok, model = AutoTokenizer.from_pretrained(tiny_model), AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    import json

    text = json.loads(texts[3])["text"]
    prefix = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
    ids = torch.tensor([[prefix] + tok(text, add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        mean_loss = model(ids, labels=ids).loss.item()  # HF's own shifted cross-entropy, mean over the text's tokens
    nll, words, tokens = rows[3]
    assert tokens == ids.shape[1] - 1 and words == len(text.split())
    assert abs(nll - mean_loss * tokens) < 1e-3 * tokens
    assert len(list(tmp_path.glob("general-*.json"))) == 1
    assert rq.general_text_nll(str(tiny_model), tmp_path) == rows  # read back from the cache
