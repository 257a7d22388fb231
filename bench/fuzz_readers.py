"""Fuzz every ingest reader through the per-file guard: generated inputs in, a Document or a ReadError out, never
anything else. Inputs are built by hypothesis (derandomized: the same inputs on every run) from format-aware
strategies: random bytes and text in several codecs for txt/md, tag soup for HTML, mutated real PDFs and DOCX files,
markup soup for reStructuredText, POD and man pages (roff requests included: .so, loops, macro definitions; a loop
that never ends is left to a test of its own, as each costs the man reader's whole time limit).

    escaped   exceptions other than ReadError that left the guard (must be 0)
    caught    inputs on which the reader itself raised something unexpected, turned into a rejection by the guard

Usage: python bench/fuzz_readers.py [--n 300]      (ends with one line: RESULT {json})
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tempfile
import time
import zipfile
from collections import Counter
from pathlib import Path

os.environ.setdefault("SLMFORGE_QUIET", "1")

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from slmforge.ingest.guard import GuardedReader  # noqa: E402
from slmforge.ingest.readers import ReadError  # noqa: E402

CODECS = ["utf-8", "utf-8-sig", "utf-16", "utf-16-le", "utf-32", "latin-1", "cp1252", "cp1250", "cp1251", "shift_jis"]
_MD = ["# ", "## ", "###### ", "```", "~~~", "===", "---", "\n", "\n\n", "* ", "1. ", "> ", "|a|b|", "    code", "\r\n", "\t"]
_HTML = ["<div>", "</div>", "<p>", "</p>", "<pre>", "</pre>", "<h1>", "</h1>", "<h3>", "<table><tr><td>", "</td><th>",
         "</tr></table>", "<ul><li>", "</li></ul>", "<script>var x=1;</script>", "<style>p{}</style>", "<nav>menu</nav>",
         "<a href='x'>", "</a>", "<code>", "</code>", "&amp;", "&#0;", "&#x110000;", "<!--", "-->", "<![CDATA[", "]]>",
         "<title>", "</title>", "<body>", "<html>", "<br/>", "<dl><dt>", "<dd>", "<svg><g>", "\x00", "\ufeff"]


_RST = ["Title\n=====\n", "Sub\n---\n", "\n\n", ".. function:: f(a, b)\n", ".. method:: C.m()\n", ".. class:: C\n",
        ".. module:: m\n", ".. versionchanged:: 3.1\n", ".. seealso::\n", ".. code-block:: python\n", ".. toctree::\n",
        ".. include:: /etc/passwd\n", ".. raw:: html\n", ".. frob:: x\n", ".. note::\n", ".. list-table::\n",
        "   :header-rows: 1\n", "   * - a\n     - b\n", "   ", ":func:`x`", ":ref:`t <l>`", ":made:`up`", "``lit``",
        "*em*", "**b**", "`t`_", ".. _t: http://x\n", "|sub|", ".. |sub| replace:: s\n", "::\n\n    code\n",
        "+---+---+\n| a | b |\n+---+---+\n", "===  ===\na    b\n===  ===\n", "- item\n", "1. item\n", "term\n  def\n",
        ":field: body\n", "-o  option\n", "[#]_", ".. [#] note\n", "\\", "\x00"]
_POD = ["=head1 NAME\n\n", "=head2 X\n\n", "=over 4\n\n", "=item B<x>\n\n", "=back\n\n", "=cut\n", "=pod\n\n",
        "=begin html\n\n", "=end html\n\n", "=for comment\n", "=encoding utf8\n\n", "=encoding bogus\n\n",
        "  verbatim code\n", "B<", "I<", "C<", "L<", "E<gt>", "E<0x110000>", "S<", ">", ">>", "Z<>", "\n\n", "\x00"]
_MAN = [".TH X 1\n", ".SH NAME\n", ".SS Sub\n", ".TP\n", ".IP\n", ".PP\n", ".nf\n", ".fi\n", ".B ", ".I ", ".BR ",
        "\\fB", "\\fI", "\\fR", "\\-", "\\(em", "\\*(", ".de xx\n..\n", ".xx\n", ".so /etc/passwd\n", ".ig\n", ".TS\n",
        "l l.\na\tb\n", ".TE\n", ".if n .ti 0\n", ".ll 2000i\n", ".nr x 1\n", ".while \\n[x] .nr x -1\n", "\\n[x]", "\n", "\x00"]


def _texty(pieces: list[str]):
    words = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=["Cs"]), max_size=30)
    return st.lists(st.one_of(st.sampled_from(pieces), words), max_size=60).map("".join)


def _encoded(text_strategy):
    return st.tuples(text_strategy, st.sampled_from(CODECS)).map(lambda tc: tc[0].encode(tc[1], errors="replace"))


def _mutate(seed_bytes: bytes):
    """A real file with a few bytes flipped, inserted or cut off."""
    edits = st.lists(st.tuples(st.integers(0, len(seed_bytes) - 1), st.integers(0, 255), st.sampled_from("fic")), max_size=8)

    def apply(es):
        b = bytearray(seed_bytes)
        for pos, val, how in es:
            pos = min(pos, len(b) - 1)
            if how == "f":
                b[pos] = val
            elif how == "i":
                b[pos:pos] = bytes([val]) * 16
            else:
                del b[pos:]
                if not b:
                    b = bytearray(b"%")
        return bytes(b)

    return edits.map(apply)


def _seed_pdf() -> bytes:
    from reportlab.lib.pagesizes import A4
    from reportlab.pdfgen import canvas

    buf = io.BytesIO()
    c = canvas.Canvas(buf, pagesize=A4)
    c.setTitle("Fuzz")
    for i in range(2):
        c.drawString(72, 720, f"Checkpoints flush dirty pages {i}.")
        c.bookmarkPage(f"p{i}")
        c.addOutlineEntry(f"Chapter {i}", f"p{i}")
        c.showPage()
    c.save()
    return buf.getvalue()


def _seed_docx() -> bytes:
    import docx

    d = docx.Document()
    d.add_heading("Runbook", level=1)
    d.add_paragraph("Take a base backup nightly.")
    t = d.add_table(rows=1, cols=2)
    t.cell(0, 0).text = "tool"
    buf = io.BytesIO()
    d.save(buf)
    return buf.getvalue()


def _zip_soup():
    """Zips whose members have DOCX names and random content (broken XML, wrong types)."""
    names = st.sampled_from(["[Content_Types].xml", "word/document.xml", "_rels/.rels", "word/styles.xml", "docProps/core.xml"])
    members = st.lists(st.tuples(names, st.binary(max_size=200)), max_size=5)

    def build(ms):
        import warnings

        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w") as z, warnings.catch_warnings():
            warnings.simplefilter("ignore")  # duplicate member names are part of the soup
            for name, data in ms:
                z.writestr(name, data)
        return buf.getvalue()

    return members.map(build)


def strategies() -> dict[str, tuple[str, object]]:
    """reader -> (file suffix, strategy of file contents)."""
    pdf, docx_bytes = _seed_pdf(), _seed_docx()
    return {
        "txt": (".txt", st.one_of(st.binary(max_size=2000), _encoded(_texty(["\n", " ", "é", "ü", "’"])))),
        "md": (".md", st.one_of(st.binary(max_size=1000), _encoded(_texty(_MD)))),
        "html": (".html", st.one_of(_encoded(_texty(_HTML)), st.binary(max_size=1000),
                                    st.integers(1, 3000).map(lambda n: ("<div>" * n + "x" + "</div>" * n).encode()))),
        "pdf": (".pdf", st.one_of(_mutate(pdf), st.binary(max_size=500).map(lambda b: b"%PDF-1.4\n" + b))),
        "docx": (".docx", st.one_of(_mutate(docx_bytes), _zip_soup(), st.binary(max_size=300).map(lambda b: b"PK\x03\x04" + b))),
        "rst": (".rst", st.one_of(_encoded(_texty(_RST)), st.binary(max_size=500))),
        "pod": (".pod", st.one_of(_encoded(_texty(_POD)), st.binary(max_size=500))),
        "man": (".1", st.one_of(_encoded(_texty(_MAN)), st.binary(max_size=500))),
    }


def fuzz(n: int, guard: GuardedReader | None = None) -> dict:
    """Run n generated inputs per reader through the guard; {reader: {"inputs", "documents", "rejected", "caught",
    "escaped", "reasons"}}."""
    own = guard is None
    guard = guard or GuardedReader(timeout_s=30, memory_mb=2048)
    results = {}
    with tempfile.TemporaryDirectory(prefix="slmforge-fuzz-") as tmp:
        root = Path(tmp)
        for reader, (suffix, strategy) in strategies().items():
            stats = {"inputs": 0, "documents": 0, "rejected": 0, "caught": 0, "escaped": 0}
            reasons: Counter = Counter()
            escaped: list[str] = []

            @settings(max_examples=n, deadline=None, derandomize=True, database=None, print_blob=False,
                      suppress_health_check=list(HealthCheck))
            @given(strategy)
            def one(data: bytes) -> None:
                f = root / f"input{suffix}"
                f.write_bytes(data)
                stats["inputs"] += 1
                try:
                    guard.read(f, root)
                    stats["documents"] += 1
                except ReadError as err:
                    stats["rejected"] += 1
                    reasons[err.reason] += 1
                    stats["caught"] += err.reason in ("reader failed", "reader crashed", "nested too deeply", "reader out of memory")
                except Exception as err:  # noqa: BLE001 (what the guard must never let out)
                    stats["escaped"] += 1
                    escaped.append(f"{type(err).__name__}: {err}"[:200])

            one()
            results[reader] = {**stats, "reasons": dict(reasons.most_common()), "escaped_examples": escaped[:5]}
    if own:
        guard.close()
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=300, help="generated inputs per reader")
    args = ap.parse_args()
    started = time.time()
    results = fuzz(args.n)
    for reader, r in results.items():
        print(f"{reader:5} inputs {r['inputs']:5}  documents {r['documents']:5}  rejected {r['rejected']:5}  "
              f"caught by the guard {r['caught']:3}  escaped {r['escaped']}  {r['reasons']}", file=sys.stderr)
    summary = {"inputs_per_reader": {k: v["inputs"] for k, v in results.items()},
               "escaped": sum(v["escaped"] for v in results.values()),
               "caught_by_guard": {k: v["caught"] for k, v in results.items()},
               "seconds": round(time.time() - started, 1)}
    print("RESULT " + json.dumps(summary))


if __name__ == "__main__":
    main()
