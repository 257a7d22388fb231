import io
import json
import re
from pathlib import Path

import pytest

from slmforge.ingest.chunking import TokenCounter, chunk_document
from slmforge.ingest.readers import ReadError, read_file
from slmforge.models import tokenizer_file
from slmforge.recipe import load_recipe
from slmforge.run import RunDir

from conftest import DEMO_DOCS, paragraph, write_recipe


@pytest.fixture(scope="module")
def counter():
    return TokenCounter(tokenizer_file("default"))


def _read(path: Path, **kw):
    return read_file(path, path.parent, **kw)


# ------------------------------------------------------------------------------------------ readers
def test_txt_keeps_paragraphs_and_provenance(tmp_path):
    f = tmp_path / "a.txt"
    f.write_text("Vacuum basics\n\nFirst paragraph.\r\n\r\n\r\n\r\nSecond paragraph.\n")
    doc = _read(f)
    assert doc.title == "Vacuum basics" and doc.format == "txt" and doc.source == "a.txt"
    assert doc.sections[0].text == "Vacuum basics\n\nFirst paragraph.\n\nSecond paragraph."
    assert len(doc.sha256) == 64 and len(doc.id) == 16


def test_markdown_heading_paths_ignore_code_fences(tmp_path):
    f = tmp_path / "g.md"
    f.write_text("# Guide\n\nintro\n\n## Install\n\nsteps\n\n```\n# not a heading\n```\n\n### Linux\n\napt\n\n## Use\n\nrun it\n\nSetext\n======\n\nbody\n")
    doc = _read(f)
    paths = [s.headings for s in doc.sections]
    assert paths == [["Guide"], ["Guide", "Install"], ["Guide", "Install", "Linux"], ["Guide", "Use"], ["Setext"]]
    assert "# not a heading" in doc.sections[1].text
    assert doc.title == "Guide"


def test_html_drops_navigation_and_keeps_structure():
    doc = _read(DEMO_DOCS / "tutorial-table.html")
    assert doc.title == "2.3. Creating a New Table"
    text = doc.text
    assert "Prev" not in text.split()[:5] and "Next" not in text.split()[-3:]  # navheader/navfooter removed
    assert "CREATE TABLE weather (\n    city            varchar(80)," in text  # <pre> whitespace kept
    assert "You can enter this into psql with the line breaks." in text  # inline <code> joined into the sentence
    numeric = _read(DEMO_DOCS / "datatype-numeric.html")
    assert ["8.1. Numeric Types", "8.1.1. Integer Types"] in [s.headings for s in numeric.sections]
    assert "smallint | 2 bytes | small-range integer | -32768 to +32767" in numeric.text  # table rows


def _pdf_bytes(pages: list[str], encrypt: str | None = None, outline: bool = True) -> bytes:
    from pypdf import PdfReader, PdfWriter
    from reportlab.pdfgen import canvas

    buf = io.BytesIO()
    c = canvas.Canvas(buf)
    c.setTitle("Ops Manual")
    for i, text in enumerate(pages):
        if outline:
            c.bookmarkPage(f"p{i}")
            c.addOutlineEntry(f"Chapter {i + 1}", f"p{i}", level=0)
        y = 800
        for line in text.split("\n"):
            c.drawString(72, y, line)
            y -= 14
        c.showPage()
    c.save()
    if encrypt is None:
        return buf.getvalue()
    writer = PdfWriter(clone_from=PdfReader(io.BytesIO(buf.getvalue())))
    writer.encrypt(encrypt)
    out = io.BytesIO()
    writer.write(out)
    return out.getvalue()


def test_pdf_text_outline_and_bad_pdfs(tmp_path):
    good = tmp_path / "manual.pdf"
    good.write_bytes(_pdf_bytes(["Checkpoints flush dirty pages.", "Replication streams WAL records."]))
    doc = _read(good)
    assert doc.title == "Ops Manual" and doc.format == "pdf"
    assert [s.headings for s in doc.sections] == [["Chapter 1"], ["Chapter 2"]]
    assert "WAL records" in doc.sections[1].text

    locked = tmp_path / "locked.pdf"
    locked.write_bytes(_pdf_bytes(["secret"], encrypt="hunter2"))
    with pytest.raises(ReadError) as err:
        _read(locked)
    assert err.value.reason == "encrypted PDF"

    corrupt = tmp_path / "corrupt.pdf"
    corrupt.write_bytes(b"%PDF-1.4\n" + b"\x8f garbage \x00" * 50)
    with pytest.raises(ReadError) as err:
        _read(corrupt)
    assert err.value.reason == "corrupt PDF"

    not_pdf = tmp_path / "fake.pdf"
    not_pdf.write_text("hello, I am text")
    with pytest.raises(ReadError, match="no %PDF header"):
        _read(not_pdf)


def test_docx_headings_tables_and_corrupt(tmp_path):
    import docx

    d = docx.Document()
    d.add_heading("Runbook", level=0)
    d.add_heading("Backups", level=1)
    d.add_paragraph("Take a base backup nightly.")
    d.add_heading("Restore", level=2)
    d.add_paragraph("Replay WAL up to the target time.")
    table = d.add_table(rows=2, cols=2)
    table.cell(0, 0).text, table.cell(0, 1).text = "tool", "purpose"
    table.cell(1, 0).text, table.cell(1, 1).text = "pg_basebackup", "copies the cluster"
    f = tmp_path / "run.docx"
    d.save(f)
    doc = _read(f)
    assert doc.title == "Runbook"
    assert [s.headings for s in doc.sections] == [["Backups"], ["Backups", "Restore"]]
    assert "pg_basebackup | copies the cluster" in doc.sections[1].text

    bad = tmp_path / "bad.docx"
    bad.write_bytes(b"PK\x03\x04 this is not really a zip")
    with pytest.raises(ReadError) as err:
        _read(bad)
    assert err.value.reason == "corrupt DOCX"


def test_binary_empty_and_encoding(tmp_path):
    binary = tmp_path / "blob.txt"
    binary.write_bytes(bytes(range(256)) * 4)
    with pytest.raises(ReadError) as err:
        _read(binary)
    assert err.value.reason == "binary file"

    empty = tmp_path / "empty.md"
    empty.write_text("  \n\n ")
    with pytest.raises(ReadError) as err:
        _read(empty)
    assert err.value.reason == "empty file"

    latin = tmp_path / "latin.txt"
    latin.write_bytes("Café crème: la réplication synchrone garantit la durabilité des données validées.".encode("cp1252"))
    doc = _read(latin)
    assert "réplication" in doc.text and doc.encoding not in (None, "utf-8")
    with pytest.raises(ReadError) as err:
        _read(latin, encoding_fallback=False)
    assert err.value.reason == "not UTF-8"


# ------------------------------------------------------------------------------------------ chunking
def test_chunks_respect_token_bound_overlap_and_headings(tmp_path, counter):
    f = tmp_path / "long.md"
    body = "\n\n".join(paragraph(i, 3) for i in range(12))
    f.write_text(f"# Big\n\n{body}\n\n## Tiny\n\nshort note.\n\n## Other\n\n" + "\n\n".join(paragraph(50 + i, 3) for i in range(6)))
    doc = _read(f)
    chunks = chunk_document(doc, counter, chunk_tokens=256, overlap=60, min_tokens=10)
    assert len(chunks) > 5
    assert all(c.n_tokens <= 256 for c in chunks)
    assert [c.index for c in chunks] == list(range(len(chunks)))
    # exact token counts are recorded
    assert [c.n_tokens for c in chunks] == counter.count_many([c.text for c in chunks])
    # neighbours inside one section share text (overlap); no chunk starts mid-heading path of another section
    big = [c for c in chunks if c.headings == ["Big"]]
    assert len(big) > 3
    for a, b in zip(big, big[1:]):
        assert b.text[:60] in a.text, "consecutive chunks of one section should overlap"
    # a heading line starts the chunk that opens a new section (unless merged into a small previous chunk)
    other = [c for c in chunks if c.headings == ["Big", "Other"] or "## Other" in c.text]
    assert other and other[0].text.lstrip().startswith(("## Other", "## Tiny"))
    # every paragraph survives chunking
    joined = "\n\n".join(c.text for c in chunks)
    for i in range(12):
        assert paragraph(i, 3)[:80] in joined


def test_oversized_paragraph_and_code_are_split(tmp_path, counter):
    f = tmp_path / "huge.txt"
    code = "\n".join(f"SELECT {i} AS col_{i}, 'value {i}' FROM generate_series(1, {i});" for i in range(120))
    f.write_text(paragraph(1, 40) + "\n\n" + code)
    doc = _read(f)
    chunks = chunk_document(doc, counter, chunk_tokens=128, overlap=0, min_tokens=8)
    assert all(c.n_tokens <= 128 for c in chunks)
    assert any("SELECT 7 AS col_7" in c.text for c in chunks)
    code_chunks = [c for c in chunks if "generate_series" in c.text]
    joined = "".join(c.text for c in code_chunks)
    # code lines stay single-newline separated (only the first follows the prose paragraph break)
    assert re.findall(r"\n\nSELECT (\d+) ", joined) in ([], ["0"])
    assert "SELECT 7 AS col_7, 'value 7' FROM generate_series(1, 7);\nSELECT 8 AS" in joined


# ------------------------------------------------------------------------------------------ stage
def test_ingest_stage_lists_bad_files_and_continues(tmp_path, corpus):
    (corpus / "blob.txt").write_bytes(b"\x00\x01\x02" * 100)
    (corpus / "empty.txt").write_text("")
    (corpus / "bad.pdf").write_bytes(b"%PDF-1.7 broken")
    (corpus / "image.png").write_bytes(b"\x89PNG")  # not an included pattern: ignored, not an error
    recipe = load_recipe(write_recipe(tmp_path, corpus))
    from slmforge.ingest.stage import IngestStage

    outcome = RunDir(recipe.run_path).execute(IngestStage(), recipe)
    counts = outcome.manifest["counts"]
    assert counts["documents"] == 12 and counts["rejected"] == 3
    assert counts["rejected_by_reason"] == {"binary file": 1, "empty file": 1, "corrupt PDF": 1}
    report = json.loads((recipe.run_path / "ingest" / "report.json").read_text())
    assert {r["source"] for r in report["rejected"]} == {"blob.txt", "empty.txt", "bad.pdf"}
    chunks = [json.loads(line) for line in (recipe.run_path / "ingest" / "chunks.jsonl").read_text().splitlines()]
    assert {c["source"] for c in chunks} >= {"guides/guide0.md", "note00.txt"}
    import datasets

    ds = datasets.load_dataset("json", data_files=str(recipe.run_path / "ingest" / "chunks.jsonl"), split="train")
    assert ds.num_rows == len(chunks) and "text" in ds.column_names


def test_empty_corpus_is_a_clear_error(tmp_path):
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "only.bin.txt").write_bytes(b"\x00" * 64)
    from typer.testing import CliRunner

    from slmforge.cli import app

    result = CliRunner().invoke(app, ["ingest", str(write_recipe(tmp_path, docs))])
    assert result.exit_code == 1
    assert "no readable documents under" in result.output and "binary file" in result.output


# ------------------------------------------------------------------------------------------ base model
@pytest.mark.parametrize("base_model", ["/nonexistent/models/mine", "./models/mine", "nobody-here/no-such-model-xyz"])
def test_missing_base_model_is_an_error_before_any_work(tmp_path, corpus, base_model, monkeypatch):
    from typer.testing import CliRunner

    from slmforge.cli import app

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    recipe = write_recipe(tmp_path, corpus, base_model=base_model)
    result = CliRunner().invoke(app, ["ingest", str(recipe)])
    assert result.exit_code == 2, result.output
    out = " ".join(result.output.split())
    assert "base_model" in out and "Traceback" not in out
    if base_model.startswith(("/", ".")):
        assert "model folder not found" in out and "models/mine" in out
    else:
        assert "no-such-model-xyz" in out and "not in the HF cache" in out and "HF_HUB_OFFLINE=1" in out
    assert not (tmp_path / "runs" / "t" / "ingest").exists()  # no stage ran, nothing chunked by whitespace


def test_hub_id_in_the_local_cache_still_works_offline(tmp_path, corpus, monkeypatch):
    """A hub id found in the HF cache (offline) gives the model's own tokenizer to ingest, as a folder would."""
    import shutil

    import huggingface_hub

    from slmforge.ingest.stage import IngestStage

    snapshot = tmp_path / "hf" / "models--someorg--tiny" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("abc123")
    shutil.copy(tokenizer_file("default"), snapshot / "tokenizer.json")
    (snapshot / "config.json").write_text("{}")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    from slmforge.models import check_model, hub_file

    hub_file.cache_clear()
    check_model("someorg/tiny")
    recipe = load_recipe(write_recipe(tmp_path, corpus, base_model="someorg/tiny"))
    outcome = RunDir(recipe.run_path).execute(IngestStage(), recipe)
    assert outcome.manifest["inputs"]["tokenizer"] != "whitespace"
    chunks = [json.loads(line) for line in (recipe.run_path / "ingest" / "chunks.jsonl").read_text().splitlines()]
    real = TokenCounter(snapshot / "tokenizer.json")
    assert [c["n_tokens"] for c in chunks] == real.count_many([c["text"] for c in chunks])
    hub_file.cache_clear()


# ------------------------------------------------------------------------------------------ decoding
FRENCH = "Le système de réplication synchrone garantit à l'université la durabilité des données validées. Où est-ce?"
GERMAN = "Die Größe der Tabelle hängt von der Anzahl der Zeilen ab. Über die Schlüssel wird schnell gesucht, äußerst nützlich."


@pytest.mark.parametrize("text, codec, label", [
    (FRENCH, "latin-1", "latin-1"),
    (GERMAN, "latin-1", "latin-1"),
    (FRENCH.replace("'", "’") + " « Guillemets » – “citation” … 5 €", "cp1252", "cp1252"),
    (FRENCH + " " + GERMAN, "utf-16-le", "utf-16-le"),
    (FRENCH + " " + GERMAN, "utf-16-be", "utf-16-be"),
    (GERMAN, "utf-32-le", "utf-32-le"),
    (FRENCH, "utf-8-sig", "utf-8-sig"),
])
def test_decoding_bom_then_utf8_then_western_before_other_codecs(tmp_path, text, codec, label):
    f = tmp_path / "doc.txt"
    bom = {"utf-16-le": b"\xff\xfe", "utf-16-be": b"\xfe\xff", "utf-32-le": b"\xff\xfe\x00\x00"}.get(codec, b"")
    f.write_bytes(bom + text.encode(codec))
    doc = _read(f)
    assert doc.text == text, doc.text  # every accented letter right: no "systčme", no "ŕ l'université"
    assert doc.encoding == label


def test_non_western_text_still_goes_to_detection(tmp_path):
    f = tmp_path / "ru.txt"
    f.write_bytes(("Индекс позволяет серверу базы данных находить и извлекать строки гораздо быстрее, чем без индекса. " * 3).encode("cp1251"))
    doc = _read(f)
    assert "Индекс позволяет" in doc.text and doc.encoding == "cp1251"


def test_ingest_report_lists_each_decoding_decision(tmp_path):
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "fr.txt").write_bytes((FRENCH + "\n\n" + paragraph(1)).encode("latin-1"))
    (docs / "wide.txt").write_bytes(b"\xff\xfe" + (GERMAN + "\n\n" + paragraph(2)).encode("utf-16-le"))
    (docs / "plain.txt").write_text(paragraph(3))
    recipe = load_recipe(write_recipe(tmp_path, docs))
    from slmforge.ingest.stage import IngestStage

    RunDir(recipe.run_path).execute(IngestStage(), recipe)
    report = json.loads((recipe.run_path / "ingest" / "report.json").read_text())
    assert {d["source"]: (d["encoding"], d["how"]) for d in report["decoding"]} == {
        "fr.txt": ("latin-1", "not valid UTF-8; Western European letters"), "wide.txt": ("utf-16-le", "byte order mark")}
    assert [w["source"] for w in report["warnings"]] == ["fr.txt"]
    assert report["counts"]["rejected"] == 0


def test_binary_bytes_after_a_utf16_bom_are_still_binary(tmp_path):
    import struct

    f = tmp_path / "blob.txt"  # packed integers after an accidental FF FE: UTF-16 decodes them to control characters
    f.write_bytes(b"\xff\xfe" + b"".join(struct.pack("<IHB", i, i % 7, 0) for i in range(500)))
    with pytest.raises(ReadError) as err:
        _read(f)
    assert err.value.reason == "binary file" or err.value.reason.startswith("not UTF-")


# ------------------------------------------------------------------------------------------ per-file guard
def _recurse(path, root, fallback):
    def down(n):
        return down(n + 1)

    return down(0)


def _hang(path, root, fallback):
    import time

    time.sleep(60)


def _hog(path, root, fallback):
    blocks = [bytearray(64 << 20) for _ in range(64)]  # 4 GB, over the 1 GB limit below
    return blocks


def _segfault(path, root, fallback):
    import ctypes

    ctypes.string_at(0)


def _bug(path, root, fallback):
    return {}["missing"]


def _by_name(path, root, fallback):
    return {"hang.txt": _hang, "hog.txt": _hog, "segv.txt": _segfault, "bug.txt": _bug, "deep.txt": _recurse}.get(
        path.name, read_file)(path, root, fallback)


def test_guard_rejects_only_the_bad_file_with_its_reason(tmp_path):
    from slmforge.ingest.guard import GuardedReader, TransientReadError

    for name in ("good1.txt", "hang.txt", "good2.txt", "hog.txt", "segv.txt", "bug.txt", "deep.txt", "good3.txt"):
        (tmp_path / name).write_text(f"{name}\n\n{paragraph(len(name))}")
    outcomes = {}
    with GuardedReader(timeout_s=3, memory_mb=1024, reader=_by_name) as guard:
        for f in sorted(tmp_path.iterdir()):
            try:
                outcomes[f.name] = guard.read(f, tmp_path).title
            except ReadError as err:
                outcomes[f.name] = (err.reason, isinstance(err, TransientReadError))
        assert guard.restarts == 2  # the hang and the segfault; the others were caught inside the reader process
    assert outcomes == {
        "good1.txt": "good1.txt", "good2.txt": "good2.txt", "good3.txt": "good3.txt",
        "hang.txt": ("reader timed out", True), "segv.txt": ("reader crashed", True),
        "hog.txt": ("reader out of memory", False), "bug.txt": ("reader failed", False),
        "deep.txt": ("nested too deeply", False),
    }


def test_deeply_nested_html_among_good_files_does_not_stop_ingest(tmp_path, corpus):
    (corpus / "deep.html").write_text("<html><body>" + "<div>" * 1000 + "<p>" + paragraph(7) + "</p>" + "</div>" * 1000
                                      + "</body></html>")
    (corpus / "deeper.html").write_text("<html><body>" + "<div>" * 25_000 + "deep text" + "</div>" * 25_000 + "</body></html>")
    recipe = load_recipe(write_recipe(tmp_path, corpus))
    from slmforge.ingest.stage import IngestStage

    counts = RunDir(recipe.run_path).execute(IngestStage(), recipe).manifest["counts"]
    report = json.loads((recipe.run_path / "ingest" / "report.json").read_text())
    docs = {json.loads(line)["source"] for line in (recipe.run_path / "ingest" / "documents.jsonl").read_text().splitlines()}
    assert {"note00.txt", "guides/guide3.md", "deep.html"} <= docs and counts["documents"] >= 13
    rejected = {r["source"]: r for r in report["rejected"]}
    assert "deeper.html" in docs or rejected["deeper.html"]["reason"], report  # named, whatever its outcome


# ------------------------------------------------------------------------------------------ symlinks
def test_symlinks_stay_inside_by_default_and_each_is_listed(tmp_path, corpus):
    outside = tmp_path / "outside"
    (outside / "folder").mkdir(parents=True)
    (outside / "secret.txt").write_text("Secret notes\n\n" + paragraph(900))
    (outside / "folder" / "far.md").write_text("# Far\n\n" + paragraph(901))
    (corpus / "secret.txt").symlink_to(outside / "secret.txt")
    (corpus / "far").symlink_to(outside / "folder")
    (corpus / "guides-again").symlink_to(corpus / "guides")  # a folder link that stays inside
    (corpus / "alias.txt").symlink_to(corpus / "note01.txt")
    (corpus / "gone.txt").symlink_to(tmp_path / "nowhere.txt")
    (corpus / "loop").symlink_to(corpus)
    from slmforge.ingest.stage import IngestStage

    recipe = load_recipe(write_recipe(tmp_path, corpus))
    RunDir(recipe.run_path).execute(IngestStage(), recipe)
    report = json.loads((recipe.run_path / "ingest" / "report.json").read_text())
    links = {link["link"]: (link["action"], link["why"]) for link in report["symlinks"]}
    assert links["secret.txt"] == ("skipped", "leaves the documents folder (ingest.follow_symlinks: inside)")
    assert links["far"][0] == "skipped" and links["gone.txt"][0] == "skipped" and links["loop"][0] == "skipped"
    assert links["guides-again"] == ("skipped", "its folder is walked already (or a link cycle)")
    assert links["alias.txt"] == ("followed", "inside the documents folder")
    sources = {json.loads(line)["source"] for line in (recipe.run_path / "ingest" / "documents.jsonl").read_text().splitlines()}
    assert "secret.txt" not in sources and not any(s.startswith("far/") for s in sources)
    assert {"alias.txt", "note01.txt"} <= sources and not any(s.startswith("guides-again/") for s in sources)
    assert report["counts"]["links_skipped"] == 5 and report["counts"]["links_followed"] == 1

    always = load_recipe(write_recipe(tmp_path, corpus, ingest={"follow_symlinks": "always"}))
    RunDir(always.run_path).execute(IngestStage(), always, force=True)
    report = json.loads((always.run_path / "ingest" / "report.json").read_text())
    sources = {json.loads(line)["source"] for line in (always.run_path / "ingest" / "documents.jsonl").read_text().splitlines()}
    assert {"secret.txt", "far/far.md"} <= sources
    assert {link["link"]: link["action"] for link in report["symlinks"]}["secret.txt"] == "followed"


# ------------------------------------------------------------------------------------------ rst / pod / man
MANUAL_PAGES = Path(__file__).parent / "data" / "manual-pages"


def test_sphinx_rst_source_keeps_sections_signatures_and_code():
    doc = read_file(MANUAL_PAGES / "bisect.rst.txt", MANUAL_PAGES)  # Sphinx builds ship sources as *.rst.txt
    assert doc.format == "rst" and doc.title == "bisect --- Array bisection algorithm"
    paths = [s.headings for s in doc.sections]
    assert ["bisect --- Array bisection algorithm", "Performance Notes"] in paths
    assert ["bisect --- Array bisection algorithm", "Examples"] in paths
    text = doc.text
    # `.. function::` -> its signature, qualified by `.. module:: bisect`, each on its own line
    assert "bisect.bisect_left(a, x, lo=0, hi=len(a), *, key=None)" in text.splitlines()
    assert "bisect.insort_right(a, x, lo=0, hi=len(a), *, key=None)\nbisect.insort(a, x, lo=0, hi=len(a), *, key=None)" in text
    assert "Changed in version 3.10: Added the key parameter." in text
    # roles become their text; no markup is left
    assert "insort_left" in text and not re.search(r":(func|class|meth|term|ref|mod):`", text)
    assert ".. function::" not in text and ".. versionchanged::" not in text and ".. seealso::" not in text
    # code stays code: lines and indentation kept
    assert "def index(a, x):\n    'Locate the leftmost value exactly equal to x'\n    i = bisect_left(a, x)" in text
    assert ">>> [grade(score) for score in [33, 99, 77, 70, 89, 90, 100]]\n['F', 'A', 'C', 'C', 'B', 'A', 'A']" in text


def test_rst_attribute_tables_and_sphinx_admonitions():
    doc = read_file(MANUAL_PAGES / "resource.rst.txt", MANUAL_PAGES)
    text = doc.text
    assert "15 | ru_nivcsw | involuntary context switches" in text  # list-table rows, like the HTML reader's tables
    assert "resource.getrusage(who)" in text.splitlines() and "exception resource.error" in text
    assert "Deprecated since version 3.3" in text or "Changed in version 3.3" in text
    assert ["resource --- Resource usage information", "Resource Limits"] in [s.headings for s in doc.sections]


def test_unknown_directives_and_roles_never_fail_and_include_reads_nothing(tmp_path):
    source = tmp_path / "odd.rst"
    source.write_text(
        "Odd page\n========\n\n"
        "Intro with :madeup:`thing`, :py:obj:`~pkg.mod.Thing` and :ref:`the guide <guide-label>`.\n\n"
        ".. frobnicate:: some argument\n   :weird-option: 1\n\n   Inner text of an unknown directive.\n\n"
        ".. include:: /etc/passwd\n\n.. raw:: html\n\n   <script>alert(1)</script>\n\n"
        ".. toctree::\n   :maxdepth: 2\n\n   other\n\n"
        ".. py:method:: Thing.run(fast=False)\n   :async:\n\n   Runs it.\n\n"
        "Sub\n---\n\n.. code-block:: python\n\n   if x:\n       y()\n")
    doc = read_file(source, tmp_path)
    text = doc.text
    assert "Intro with thing, Thing and the guide." in text
    assert "Inner text of an unknown directive." in text and "some argument" not in text
    assert "root:" not in text and "<script>" not in text and "other" not in text.split()
    assert "Thing.run(fast=False)" in text.splitlines() and "Runs it." in text
    assert [s.headings for s in doc.sections][-1] == ["Odd page", "Sub"] and "if x:\n    y()" in doc.sections[-1].text


def test_pod_and_man_pages_are_read_with_their_structure(tmp_path):
    import shutil

    if not shutil.which("perl") or not shutil.which("groff"):
        pytest.skip("perl and groff (groff-base) are the POD and man readers")
    pod = tmp_path / "frob.pod"
    pod.write_text("=head1 NAME\n\nfrob - frobnicate widgets\n\n=head1 SYNOPSIS\n\n  frob --level 3 widget.txt\n\n"
                   "=head1 OPTIONS\n\n=over 4\n\n=item B<--level> I<n>\n\nHow hard to frobnicate, from 1 to 9.\n\n"
                   "=back\n\n=head2 Exit status\n\nZero on success.\n\n=cut\n")
    doc = read_file(pod, tmp_path)
    assert doc.format == "pod" and doc.title == "frob"
    by_path = {tuple(s.headings): s.text for s in doc.sections}
    assert "  frob --level 3 widget.txt" in by_path[("SYNOPSIS",)] or "frob --level 3 widget.txt" in by_path[("SYNOPSIS",)]
    assert "--level n" in by_path[("OPTIONS",)] and "How hard to frobnicate, from 1 to 9." in by_path[("OPTIONS",)]
    assert by_path[("OPTIONS", "Exit status")] == "Zero on success."

    man = tmp_path / "frob.1"
    man.write_text('.TH FROB 1 "2026-01-01" "frob 1.0" "User Commands"\n.SH NAME\nfrob \\- frobnicate widgets\n'
                   ".SH SYNOPSIS\n.B frob\n[\\fB\\-\\-level\\fR \\fIn\\fR] \\fIfile\\fR\n.SH OPTIONS\n.TP\n"
                   "\\fB\\-\\-level\\fR \\fIn\\fR\nHow hard to frobnicate,\nfrom 1 to 9.\n.SS Exit status\nZero on success.\n"
                   ".SH EXAMPLE\n.nf\nfrob \\-\\-level 3 a.txt\nfrob b.txt\n.fi\n")
    doc = read_file(man, tmp_path)
    assert doc.format == "man" and doc.title == "frob - frobnicate widgets"
    by_path = {tuple(s.headings): s.text for s in doc.sections}
    assert by_path[("SYNOPSIS",)] == "frob [--level n] file"
    assert "--level n" in by_path[("OPTIONS",)] and "How hard to frobnicate, from 1 to 9." in by_path[("OPTIONS",)]
    assert by_path[("OPTIONS", "Exit status")] == "Zero on success."
    assert by_path[("EXAMPLE",)] == "frob --level 3 a.txt\nfrob b.txt"  # no-fill lines stay lines
    assert not any("FROB(1)" in s.text for s in doc.sections)  # page header and footer dropped
    (tmp_path / "notes.1").write_text("plain words\nwithout a title request\n")  # no .TH: no page layout to read
    doc = read_file(tmp_path / "notes.1", tmp_path)
    assert doc.sections[0].headings == [] and doc.text == "plain words without a title request"


def test_rst_pod_and_man_are_in_the_default_include_patterns(tmp_path):
    from slmforge.ingest.files import walk_documents
    from slmforge.recipe import IngestConfig

    for name in ("a.rst", "b.pod", "c.1", "d.8", "e.man", "f.rst.txt"):
        (tmp_path / name).write_text("x")
    found = {p.name for p in walk_documents(tmp_path, IngestConfig().include, []).files}
    assert {"a.rst", "b.pod", "c.1", "d.8", "e.man", "f.rst.txt"} <= found


def test_man_page_cannot_read_other_files_or_loop_forever(tmp_path, monkeypatch):
    import shutil

    from slmforge.ingest import readers

    if not shutil.which("groff"):
        pytest.skip("groff (groff-base) is the man page reader")
    secret = tmp_path / "secret.txt"
    secret.write_text("TOPSECRET\n")
    page = tmp_path / "inc.1"
    page.write_text(f".TH INC 1\n.SH NAME\ninc \\- includes\n.SH DESCRIPTION\nBefore.\n.so {secret}\n.cf {secret}\n"
                    f".mso {secret}\nAfter.\n")
    doc = read_file(page, tmp_path)
    assert "TOPSECRET" not in doc.text and "Before." in doc.text and "After." in doc.text
    monkeypatch.setattr(readers, "MAN_TIMEOUT_S", 1.0)
    (tmp_path / "loop.1").write_text(".TH LOOP 1\n.SH NAME\nloop\n.while 1 .\n")
    with pytest.raises(ReadError) as err:
        read_file(tmp_path / "loop.1", tmp_path)
    assert err.value.reason == "corrupt man page" and "took over 1 s" in err.value.detail


def test_chunks_hold_no_sentence_twice_and_no_one_entry_fragments(counter):
    # a paragraph moved to the next chunk once landed beside its own carried closing sentences there
    page = read_file(DEMO_DOCS / "datatype-boolean.html", DEMO_DOCS)
    for chunk in chunk_document(page, counter, 384, 48, 24):
        sentences = [s for s in re.split(r"(?<=[.!?])\s+", chunk.text) if len(s) > 60]
        assert len(sentences) == len(set(sentences)), chunk.text
    # pages of short API entries once overran the bound by their joins and split off one-entry chunks
    api = read_file(MANUAL_PAGES / "stat.rst.txt", MANUAL_PAGES)
    chunks = chunk_document(api, counter, 256, 0, 24)
    assert all(c.n_tokens <= 256 for c in chunks)
    assert [c.text for c in chunks[:-1] if c.n_tokens < 24] == []
