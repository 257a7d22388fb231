"""FAQ pages -> question/answer items for bench/real_questions.py, with every dropped item kept and its reason.

One parser per FAQ format; each returns (kept, dropped) lists of dicts {question, answer, section, source} (dropped
ones add "reason"). The HTML formats are read with slmforge's own HTML reader (`slmforge.ingest.readers.read_html`,
a selectolax tree walk), so an FAQ answer is turned into text exactly as the corpus pages are for training.

    texinfo_html   R-FAQ.html (makeinfo): each h2-h4 heading is one item, the text up to the next heading its
                   answer; the "Next: / Previous: / Up:" bars and section menus are removed first.
    docbook_html   the Debian FAQ (DocBook XSL, one page per chapter): each h2-h4 heading is one item, its answer the
                   text up to the next heading; DocBook's navigation bars and tables of contents are dropped by the
                   reader already.
    sqlite_faq     SQLite's faq.html: `<p><b>(N) question</b></p>` followed by a `<blockquote>` answer.
    asciidoc_faq   git's gitfaq.txt: `[[anchor]]` + `Question?::` + the indented/`+`-continued paragraphs after it;
                   the `Title` + `-----` headings are the sections.

The drop rules, applied to every format by `screen()` (in this order; the first that fires is the reason):
    not a question      (heading-based FAQs only: R, Debian) the heading asks nothing (no "?" at its end and no
                        question word first), e.g. "Legalese", "Citing R"
    empty answer        a heading with no text of its own (e.g. a chapter heading followed by its first question)
    points elsewhere    the answer only sends the reader somewhere else: nothing but URLs or addresses; or under
                        25 words and it starts with "See", "Please see", "Refer to", "Read", "Consult", "Look at",
                        "Check"; or under 12 words around a "see X"; or one sentence with a URL or "see" whose point
                        is where the answer is ("... can be reviewed at URL", "for more information see ...")
    answer too short    fewer than 3 words
    duplicate question  the same question (case and spaces ignored) seen earlier in the same FAQ
"""

from __future__ import annotations

import re
from pathlib import Path

QUESTION_WORDS = ("how", "what", "why", "when", "where", "which", "who", "whom", "whose", "can", "could", "does",
                  "do", "did", "is", "are", "was", "were", "should", "shall", "will", "would", "may", "might", "must",
                  "has", "have", "isn't", "aren't", "doesn't", "don't", "won't", "can't", "i")
_POINTER_START = re.compile(r"^\s*(please\s+)?(see|refer to|read|consult|look at|check|have a look at|the answer is in)\b",
                            re.IGNORECASE)
_SEE_REF = re.compile(r"\b(see|refer to|consult)\b", re.IGNORECASE)
_URL = re.compile(r"(https?|ftp)://\S+|www\.\S+|\S+@\S+\.\w+")
# "2.1 ", "1.3. ", "A.1 ", "Chapter 3. ", "Appendix A. " section numbers
_POINTER_PHRASE = re.compile(r"\b(can be (found|read|reviewed|seen)|(is|are) (described|discussed|explained|answered|covered) "
                             r"(in|at)|for (more|further) (information|details)|(a|an) (post|response|discussion)\b)",
                             re.IGNORECASE)
_NUMBER = re.compile(r"^\s*((chapter|appendix)\s+)?(\d+(\.\d+)*\.?|[A-Z](\.\d+)*\.)\s+", re.IGNORECASE)


def words(text: str) -> list[str]:
    return text.split()


def clean_heading(text: str) -> str:
    return _NUMBER.sub("", " ".join(text.split())).strip()


def is_question(text: str) -> bool:
    text = text.strip()
    if re.search(r"\?[!.\"')]*$", text):  # "...what is Linux?!"
        return True
    first = text.split(maxsplit=1)[0].lower().strip("\"'(") if text else ""
    return first in QUESTION_WORDS


def points_elsewhere(answer: str) -> bool:
    """True for an answer that only sends the reader elsewhere ("See section 5", a bare URL, "Please see the ...")."""
    ws = words(answer)
    if not ws:
        return False
    no_urls = _URL.sub(" ", answer)
    if len(words(no_urls)) <= 2:  # nothing but URLs / addresses and a word or two
        return True
    if len(ws) >= 25:
        return False
    if _POINTER_START.match(answer):
        return True
    # short and built around "see X": at most a few words of its own besides the reference
    if _SEE_REF.search(answer) and len(ws) < 12:
        return True
    # one sentence whose point is where the answer lives: "... a post to r-help, which can be reviewed at URL"
    one_sentence = len(re.findall(r"[.!?](\s|$)", answer.strip())) <= 1
    return one_sentence and bool(_URL.search(answer) or _SEE_REF.search(answer)) and bool(_POINTER_PHRASE.search(answer))


def screen(items: list[dict], require_question: bool = True) -> tuple[list[dict], list[dict]]:
    """Apply the drop rules (module docstring) to raw {question, answer, section, source} items.

    `require_question=False` for FAQ formats whose every entry is an FAQ entry by markup (SQLite's numbered list,
    gitfaq's `Question::` items): there a problem stated without a question mark ("INSERT is really slow") is still
    what a user asks; heading-based FAQs (R, Debian) also have headings that are not questions ("Legalese").
    """
    kept, dropped, seen = [], [], set()
    for item in items:
        q, a = item["question"], " ".join(item["answer"].split())
        reason = None
        if require_question and not is_question(q):
            reason = "not a question"
        elif not a:
            reason = "empty answer"
        elif points_elsewhere(item["answer"]):
            reason = "points elsewhere"
        elif len(words(a)) < 3:
            reason = "answer too short"
        elif " ".join(q.lower().split()) in seen:
            reason = "duplicate question"
        if reason:
            dropped.append({**item, "reason": reason})
        else:
            seen.add(" ".join(q.lower().split()))
            kept.append(item)
    return kept, dropped


# ------------------------------------------------------------------------------------------------ HTML helpers
def _html_sections(html: str, drop_css: str = "") -> list:
    """slmforge's HTML reader on `html` after removing the nodes matched by `drop_css`: its [Section(headings, text)]."""
    from selectolax.lexbor import LexborHTMLParser

    from slmforge.ingest.readers import read_html

    if drop_css:
        tree = LexborHTMLParser(html)
        for node in tree.css(drop_css):
            node.decompose()
        html = tree.html or ""
    _, sections, _ = read_html(html.encode("utf-8"), Path("faq.html"), True)
    return sections


def _heading_items(html: str, source: str, drop_css: str, min_level_is_chapter: bool) -> list[dict]:
    """One raw item per heading: the question is the innermost heading, the section the chapter heading above it."""
    sections = [s for s in _html_sections(html, drop_css) if s.headings]  # text before the first heading: title page
    own = {tuple(s.headings) for s in sections}
    items, seen = [], set()
    for sec in sections:
        # the reader emits only headings with text; a heading with none of its own (a chapter heading right before
        # its first question) shows only as a parent in the heading path: it becomes an item with an empty answer
        paths = [tuple(sec.headings[:k]) for k in range(1, len(sec.headings))]
        for path in [p for p in paths if p not in own and p not in seen] + [tuple(sec.headings)]:
            seen.add(path)
            question = clean_heading(path[-1])
            chapter = path[1] if min_level_is_chapter and len(path) > 1 else path[0]
            answer = sec.text.strip() if path == tuple(sec.headings) else ""
            items.append({"question": question, "answer": answer, "section": clean_heading(chapter), "source": source})
    return items


def texinfo_html(html: str, source: str = "R-FAQ.html") -> list[dict]:
    """R-FAQ.html: headings h1 (title) > h2 chapter > h3 section > h4 subsection; navigation bars removed."""
    # div.header: "Next: ... Previous: ... Up: ... [Contents]"; ul.section-toc / table.menu: a chapter's own menu;
    # div.contents / div.shortcontents: the table of contents; the title page block before the first chapter.
    drop = "div.header, ul.section-toc, table.menu, div.contents, div.shortcontents, div.titlepage"
    items = _heading_items(html, source, drop, min_level_is_chapter=True)
    # the h1 title and the "Table of Contents" heading are not FAQ entries
    return [i for i in items if i["question"] not in ("R FAQ", "Table of Contents", "Frequently Asked Questions on R")]


def docbook_html(html: str, source: str) -> list[dict]:
    """One chapter page of a DocBook-XSL FAQ: h1 chapter > h2 question > h3 sub-question."""
    # DocBook's navheader/navfooter/toc are removed by slmforge's reader; div.titlepage wrappers hold only headings
    return _heading_items(html, source, "", min_level_is_chapter=False)


def sqlite_faq(html: str, source: str = "faq.html") -> list[dict]:
    """SQLite faq.html: `<p><b>(N) question</b></p>` followed by a `<blockquote>` answer."""
    from selectolax.lexbor import LexborHTMLParser

    tree = LexborHTMLParser(html)
    items = []
    for bold in tree.css("p > b"):
        m = re.match(r"^\s*\((\d+)\)\s*(.+)$", bold.text(deep=True, separator=""), re.DOTALL)
        if not m:
            continue
        answer_node = bold.parent.next
        while answer_node is not None and answer_node.tag in ("-text", "-comment"):
            answer_node = answer_node.next
        answer = ""
        if answer_node is not None and answer_node.tag == "blockquote":
            answer = "\n\n".join(s.text for s in _html_sections(f"<html><body>{answer_node.html}</body></html>"))
        items.append({"question": " ".join(m.group(2).split()), "answer": answer.strip(), "section": "",
                      "source": f"{source}#q{m.group(1)}"})
    return items


def asciidoc_faq(text: str, source: str = "gitfaq.txt") -> list[dict]:
    """gitfaq.txt: `Section\\n-------` headings; items `[[anchor]]` / `Question::` / answer paragraphs joined by `+`."""
    lines = text.replace("\r\n", "\n").split("\n")
    items, section, current, body = [], "", None, []

    def flush():
        if current is not None:
            items.append({"question": current[1], "answer": _asciidoc_text(body), "section": section,
                          "source": f"{source}#{current[0]}"})

    i = 0
    while i < len(lines):
        line = lines[i]
        nxt = lines[i + 1] if i + 1 < len(lines) else ""
        if line.strip() and re.fullmatch(r"-{3,}", nxt.strip()) and len(nxt.strip()) == len(line.strip()) and not line.startswith((" ", "\t")):
            flush()
            current, body, section = None, [], line.strip()
            i += 2
            continue
        anchor = re.fullmatch(r"\[\[([^\]]+)\]\]", line.strip())
        if anchor and i + 1 < len(lines) and nxt.rstrip().endswith("::"):
            flush()
            current, body = (anchor.group(1), nxt.strip()[:-2].strip()), []
            i += 2
            continue
        if current is not None:
            body.append(line)
        i += 1
    flush()
    return items


def _asciidoc_text(lines: list[str]) -> str:
    """AsciiDoc markup -> plain text: `+` joins become paragraph breaks, `linkgit:x[1]` -> `x(1)`, backticks dropped."""
    out = []
    for line in lines:
        s = line.strip()
        if s == "+":
            out.append("")
        elif re.fullmatch(r"-{4,}", s):
            continue  # listing block fences; the code lines themselves are kept
        else:
            out.append(s)
    text = "\n".join(out)
    text = re.sub(r"linkgit:([\w.-]+)\[(\d+)\]", r"\1(\2)", text)
    text = re.sub(r"`([^`]*)`", r"\1", text)
    return re.sub(r"\n{3,}", "\n\n", text).strip()
