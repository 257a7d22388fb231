"""One reader per format: raw file -> Document with title and heading-structured sections.

A reader raises ReadError with a short reason ("encrypted PDF", "binary file", ...) that the stage reports per
file; it never stops the run.
"""

from __future__ import annotations

import re
from pathlib import Path

from slmforge.records import Document, Section
from slmforge.run import sha256_bytes

FORMATS = {".txt": "txt", ".md": "md", ".markdown": "md", ".html": "html", ".htm": "html", ".pdf": "pdf", ".docx": "docx",
           ".rst": "rst", ".rest": "rst", ".pod": "pod", ".man": "man", **{f".{n}": "man" for n in range(1, 10)}}


def file_format(path: Path) -> str | None:
    """The reader for a file name; Sphinx HTML builds ship their sources as `_sources/*.rst.txt`: rST, not text."""
    if path.name.lower().endswith(".rst.txt"):
        return "rst"
    return FORMATS.get(path.suffix.lower())


class ReadError(Exception):
    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason, self.detail = reason, detail


def doc_id(relpath: str) -> str:
    """Stable across content edits, so the held-out split does not move when a file is fixed."""
    return sha256_bytes(relpath.encode())[:16]


def read_file(path: Path, root: Path, encoding_fallback: bool = True) -> Document:
    rel = path.relative_to(root).as_posix()
    fmt = file_format(path)
    if fmt is None:
        raise ReadError("unsupported file type", path.suffix)
    data = path.read_bytes()
    if not data.strip():
        raise ReadError("empty file")
    title, sections, encoding = READERS[fmt](data, path, encoding_fallback)
    sections = [s for s in sections if s.text.strip()]
    if not sections:
        raise ReadError("no text", "the file parsed but contains no text")
    return Document(
        id=doc_id(rel), source=rel, format=fmt, sha256=sha256_bytes(data),
        title=" ".join((title or path.stem).split())[:300], sections=sections, encoding=encoding,
    )


# ------------------------------------------------------------------------------------------ text decoding
# Byte order marks, longest first (the UTF-32 LE mark begins with the UTF-16 LE one).
_BOMS = ((b"\xff\xfe\x00\x00", "utf-32-le"), (b"\x00\x00\xfe\xff", "utf-32-be"), (b"\xef\xbb\xbf", "utf-8-sig"),
         (b"\xff\xfe", "utf-16-le"), (b"\xfe\xff", "utf-16-be"))
# Codecs charset detection may choose when the text is not Western European (Western is decided first, below).
PLAUSIBLE_CODECS = ["cp1250", "iso8859_2", "cp1251", "koi8_r", "iso8859_5", "cp1253", "iso8859_7", "cp1254", "cp1257",
                    "iso8859_13", "cp1255", "cp1256", "shift_jis", "euc_jp", "gb18030", "big5", "euc_kr"]
# Letters of Western European languages beyond ASCII (Latin-1 Supplement, plus French oe/OE/Y-diaeresis), and the
# punctuation cp1252 adds; a decode whose other characters fall outside this set is not Western text.
_WESTERN_LETTERS = {chr(c) for c in range(0xC0, 0x100) if c not in (0xD7, 0xF7)} | set("ŒœŸ")
_WESTERN_OTHER = set("\u00a0¡¢£¤¥¦§¨©ª«¬\u00ad®¯°±²³´µ¶·¸¹º»¼½¾¿×÷€‚„…†‡ˆ‰‹‘’“”•–—˜™›")


def _western(text: str) -> bool:
    """Does this decode read as Western European text? Accented letters must be a minority among letters and sit
    inside mostly-ASCII words; Cyrillic or Greek bytes decoded as cp1252 give words made only of accented letters."""
    letters = sum(ch.isalpha() for ch in text)
    extra = [ch for ch in text if ord(ch) > 0x7F]
    if not letters or any(ch not in _WESTERN_LETTERS and ch not in _WESTERN_OTHER for ch in extra):
        return False
    accented = sum(ch in _WESTERN_LETTERS for ch in extra)
    heavy = sum(1 for w in re.findall(r"\w+", text) if sum(ch in _WESTERN_LETTERS for ch in w) >= 3)
    words = max(1, len(re.findall(r"\w+", text)))
    return accented / letters <= 0.25 and heavy / words <= 0.05


def decode_text(data: bytes, allow_fallback: bool) -> tuple[str, str]:
    """Bytes -> (text, codec): a byte order mark first (UTF-8/16/32), then strict UTF-8, then (when allowed)
    Western European (cp1252, called latin-1 when no byte in 0x80-0x9F occurs, where the two differ), then charset
    detection over PLAUSIBLE_CODECS. charset_normalizer alone is not used for the Western case: on short French or
    German latin-1 text it ranks cp1250 first with the same zero chaos ("systčme", "ŕ l'université")."""
    bom_error = None
    for bom, codec in _BOMS:
        if data.startswith(bom):
            try:
                text = data[len(bom):].decode(codec.removesuffix("-sig"))
            except UnicodeDecodeError as err:  # FF FE 00 00 may also be a UTF-16 LE mark and a NUL: try the next
                bom_error = bom_error or ReadError(f"not {codec.removesuffix('-sig').upper()}", f"starts with a {codec} "
                                                   f"byte order mark but has an invalid byte at offset {err.start + len(bom)}")
                continue
            sample = text[:4096]
            if sum(ch.isprintable() or ch.isspace() for ch in sample) < 0.95 * len(sample):
                raise ReadError("binary file", f"starts with a {codec} byte order mark but decodes to control characters")
            return text, codec
    if bom_error is not None:
        raise bom_error
    if b"\x00" in data[:8192]:
        raise ReadError("binary file", "contains NUL bytes; not a text document")
    try:
        return data.decode("utf-8"), "utf-8"
    except UnicodeDecodeError as err:
        if not allow_fallback:
            raise ReadError("not UTF-8", f"invalid byte at offset {err.start}") from None
    try:
        text = data.decode("cp1252")
    except UnicodeDecodeError:
        text = None  # one of the five bytes cp1252 leaves undefined: not Western
    if text is not None and _western(text):
        return text, "cp1252" if re.search(rb"[\x80-\x9f]", data) else "latin-1"
    from charset_normalizer import from_bytes

    best = from_bytes(data, cp_isolation=PLAUSIBLE_CODECS).best()
    if best is None or best.chaos > 0.2:
        raise ReadError("not UTF-8", "and no other encoding fits the bytes")
    return str(best), best.encoding


def _paragraphs(text: str) -> str:
    return re.sub(r"\n{3,}", "\n\n", text.replace("\r\n", "\n").replace("\r", "\n")).strip()


# ------------------------------------------------------------------------------------------ txt / md
def read_txt(data: bytes, path: Path, fallback: bool):
    text, enc = decode_text(data, fallback)
    text = _paragraphs(text)
    first = next((ln.strip() for ln in text.splitlines() if ln.strip()), path.stem)
    return first[:120], [Section(headings=[], text=text)], enc


_ATX = re.compile(r"^(#{1,6})\s+(.+?)\s*#*\s*$")
_FENCE = re.compile(r"^\s*(```|~~~)")


def read_md(data: bytes, path: Path, fallback: bool):
    text, enc = decode_text(data, fallback)
    lines = text.replace("\r\n", "\n").split("\n")
    sections: list[Section] = []
    stack: list[tuple[int, str]] = []
    buf: list[str] = []
    title = None
    in_fence = False

    def flush():
        if "".join(buf).strip():
            sections.append(Section(headings=[h for _, h in stack], text=_paragraphs("\n".join(buf))))
        buf.clear()

    for i, line in enumerate(lines):
        if _FENCE.match(line):
            in_fence = not in_fence
        m = None if in_fence else _ATX.match(line)
        # setext headings: a text line underlined with === (level 1) or --- (level 2)
        setext = (not in_fence and i + 1 < len(lines) and line.strip() and not line.startswith((" ", "-", "*", "#"))
                  and re.fullmatch(r"=+\s*|-{3,}\s*", lines[i + 1]) is not None)
        if m or setext:
            flush()
            level, heading = (len(m.group(1)), m.group(2)) if m else ((1 if lines[i + 1].startswith("=") else 2), line.strip())
            while stack and stack[-1][0] >= level:
                stack.pop()
            stack.append((level, heading))
            title = title or heading
            continue
        if re.fullmatch(r"=+\s*|-{3,}\s*", line) and i > 0 and sections and not buf:
            continue  # the underline of a setext heading already consumed
        buf.append(line)
    flush()
    return title, sections, enc


# ------------------------------------------------------------------------------------------ html
# selectolax is a real HTML5 parser; we only walk its tree, because extractors such as trafilatura flatten away the
# heading structure and code blocks that chunking and provenance need.
_DROP = "script, style, noscript, nav, header, footer, aside, form, iframe, svg, .navheader, .navfooter, .toc, .breadcrumb, [role=navigation]"
_HEADINGS = {"h1": 1, "h2": 2, "h3": 3, "h4": 4, "h5": 5, "h6": 6}
_BLOCKS = {"p", "pre", "li", "dt", "dd", "tr", "blockquote", "caption", "figcaption", "td", "th", "div", "section",
           "article", "main", "table", "ul", "ol", "dl", "tbody", "thead", "body", "html"}
_LEAF_BLOCKS = {"p", "li", "dt", "dd", "tr", "blockquote", "caption", "figcaption"}


def read_html(data: bytes, path: Path, fallback: bool):
    from selectolax.lexbor import LexborHTMLParser as HTMLParser

    text, enc = decode_text(data, fallback)
    tree = HTMLParser(text)
    title_node = tree.css_first("title")
    title = title_node.text(strip=True) if title_node else None
    for node in tree.css(_DROP):
        node.decompose()
    root = tree.body or tree.root
    sections: list[Section] = []
    stack: list[tuple[int, str]] = []
    buf: list[str] = []
    run: list[str] = []  # consecutive inline pieces (text, <code>, <a>) that form one paragraph

    def end_run():
        text = re.sub(r"\s+", " ", " ".join(run)).strip()
        run.clear()
        if text:
            buf.append(re.sub(r"\s+([,.;:)])", r"\1", text))

    def add(block: str):
        end_run()
        if block.strip():
            buf.append(block)

    def flush():
        end_run()
        if buf:
            sections.append(Section(headings=[h for _, h in stack], text="\n\n".join(buf)))
            buf.clear()

    def inline(node) -> str:
        return re.sub(r"\s+", " ", node.text(deep=True, separator="")).strip()

    def visit(node):
        for child in node.iter(include_text=True):
            tag = child.tag
            if tag == "-text":
                run.append(child.text_content or "")
            elif tag in _HEADINGS:
                flush()
                level = _HEADINGS[tag]
                while stack and stack[-1][0] >= level:
                    stack.pop()
                stack.append((level, inline(child)))
            elif tag == "pre":
                add((child.text(deep=True, separator="") or "").strip("\n"))
            elif tag == "tr":
                cells = [inline(c) for c in child.iter() if c.tag in ("td", "th")]
                add(" | ".join(c for c in cells if c))
            elif tag in _LEAF_BLOCKS and not _has_structure(child):
                add(inline(child))
            elif tag in _BLOCKS or tag in _LEAF_BLOCKS:
                end_run()
                visit(child)
                end_run()
            else:  # inline element (<code>, <a>, <em>) continuing the current paragraph
                run.append(child.text(deep=True, separator=""))

    visit(root)
    flush()
    if not title and stack:
        title = stack[0][1]
    return title, sections, enc


def _has_structure(node) -> bool:
    nodes = node.traverse()
    next(nodes, None)  # traverse() yields the node itself first
    return any(d.tag in _HEADINGS or d.tag in ("pre", "p", "table", "ul", "ol", "dl") for d in nodes)


# ------------------------------------------------------------------------------------------ pdf
def read_pdf(data: bytes, path: Path, fallback: bool):
    import io

    from pypdf import PdfReader
    from pypdf.errors import PdfReadError

    if not data.startswith(b"%PDF"):
        raise ReadError("corrupt PDF", "no %PDF header")
    try:
        reader = PdfReader(io.BytesIO(data))
        if reader.is_encrypted and not reader.decrypt(""):
            raise ReadError("encrypted PDF", "a password is required")
        pages = [(p.extract_text() or "") for p in reader.pages]
        outline = _pdf_outline(reader)
        meta_title = (reader.metadata or {}).get("/Title") if reader.metadata else None
    except ReadError:
        raise
    except (PdfReadError, ValueError, KeyError, TypeError, AttributeError) as err:
        raise ReadError("corrupt PDF", str(err)[:200]) from None
    except Exception as err:  # pypdf raises many types on damaged files; the run must go on
        if "encrypt" in str(err).lower() or "crypt" in type(err).__name__.lower():
            raise ReadError("encrypted PDF", str(err)[:200]) from None
        raise ReadError("corrupt PDF", f"{type(err).__name__}: {str(err)[:200]}") from None
    if not any(p.strip() for p in pages):
        raise ReadError("no extractable text", "scanned or image-only PDF (OCR is not supported)")
    sections = []
    for i, text in enumerate(pages):
        heading = [t for page, t in outline if page <= i][-1:] or [f"page {i + 1}"]
        sections.append(Section(headings=heading, text=_paragraphs(text)))
    return (str(meta_title) if meta_title else None), sections, None


def _pdf_outline(reader) -> list[tuple[int, str]]:
    out = []

    def walk(items):
        for item in items:
            if isinstance(item, list):
                walk(item)
            else:
                try:
                    out.append((reader.get_destination_page_number(item), str(item.title)))
                except Exception:
                    pass

    try:
        walk(reader.outline)
    except Exception:
        return []
    return sorted(out)


# ------------------------------------------------------------------------------------------ docx
def read_docx(data: bytes, path: Path, fallback: bool):
    import io
    import zipfile

    import docx

    try:
        document = docx.Document(io.BytesIO(data))
    except (zipfile.BadZipFile, KeyError, ValueError) as err:
        raise ReadError("corrupt DOCX", f"{type(err).__name__}: {str(err)[:200]}") from None
    except Exception as err:
        raise ReadError("corrupt DOCX", f"{type(err).__name__}: {str(err)[:200]}") from None
    title = document.core_properties.title or None
    sections: list[Section] = []
    stack: list[tuple[int, str]] = []
    buf: list[str] = []

    def flush():
        if buf:
            sections.append(Section(headings=[h for _, h in stack], text="\n\n".join(buf)))
            buf.clear()

    for block in document.iter_inner_content():
        if isinstance(block, docx.table.Table):
            for row in block.rows:
                cells = [c.text.strip() for c in row.cells]
                if any(cells):
                    buf.append(" | ".join(cells))
            continue
        text = block.text.strip()
        style = (block.style.name if block.style is not None else "") or ""
        if not text:
            continue
        if style == "Title":
            title = title or text
            continue
        m = re.match(r"Heading (\d)", style)
        if m:
            flush()
            level = int(m.group(1))
            while stack and stack[-1][0] >= level:
                stack.pop()
            stack.append((level, text))
            continue
        buf.append(text)
    flush()
    return title, sections, None


# ------------------------------------------------------------------------------------------ rst
def read_rst(data: bytes, path: Path, fallback: bool):
    from slmforge.ingest.rst import parse_rst

    text, enc = decode_text(data, fallback)
    try:
        title, sections = parse_rst(text.replace("\r\n", "\n"))
    except (RecursionError, MemoryError):
        raise
    except Exception as err:  # docutils raises its own types (and the odd IndexError) on malformed markup
        raise ReadError("malformed reStructuredText", f"{type(err).__name__}: {str(err)[:200]}") from None
    return title, sections, enc


# ------------------------------------------------------------------------------------------ pod / man
# Real parsers, run as programs: POD through Pod::Simple::XHTML (perl's own POD parser, in every perl since 5.10) into
# HTML that read_html walks (=head1/=head2 become headings, verbatim paragraphs <pre>); man pages through groff's
# man macros (groff-base, what `man` itself runs) as plain text, whose layout marks the structure: .SH headings at
# column 0, .SS at column 3, the body indented 7. No regexes over roff or POD source.
_POD_TO_HTML = ("use Pod::Simple::XHTML; my $p = Pod::Simple::XHTML->new; $p->html_header(''); $p->html_footer('');"
                "$p->index(0); my $out; $p->output_string(\\$out); $p->parse_file($ARGV[0]); print $out;")


def _run_tool(argv: list[str], what: str, timeout: float = 60, **kw) -> bytes:
    import shutil
    import subprocess

    if shutil.which(argv[0]) is None:
        raise ReadError(f"{what} reader unavailable", f"needs `{argv[0]}` on PATH")
    import os
    import signal

    data = kw.pop("input", None)
    # its own process group: groff runs troff and grotty as children, and a timeout must end all of them (killing
    # groff alone left troff looping at full CPU)
    proc = subprocess.Popen(argv, stdin=subprocess.PIPE if data is not None else subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, start_new_session=True, **kw)
    try:
        out, err = proc.communicate(data, timeout=timeout)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.communicate()
        raise ReadError(f"corrupt {what}", f"{argv[0]} took over {timeout:g} s") from None
    if proc.returncode != 0:
        raise ReadError(f"corrupt {what}", f"{argv[0]} exited {proc.returncode}: {err.decode(errors='replace')[:200]}")
    return out


def read_pod(data: bytes, path: Path, fallback: bool):
    decode_text(data, fallback)  # binary and undecodable files are rejected like any text file
    html = _run_tool(["perl", "-e", _POD_TO_HTML, str(path)], "POD")
    if not html.strip():
        raise ReadError("no text", "no POD in the file")
    title, sections, _ = read_html(html, path, True)
    name = next((s.text.split(" - ", 1)[0].strip() for s in sections if s.headings[:1] == ["NAME"]), None)
    return name or title, sections, "utf-8"


MAN_TIMEOUT_S = 10.0  # a real page renders in well under a second; roff can loop forever (`.while 1 .`)
# requests that read other files into the page (groff's safer mode, its default, still allows these)
_ROFF_FILE_REQUESTS = re.compile(rb"^[.'][ \t]*(?:so|mso|cf|trf|nx|rd|pso|open|opena|sy|pi|lf)(?=[ \t\n]|$).*$", re.M)


def read_man(data: bytes, path: Path, fallback: bool):
    import os

    decode_text(data, fallback)
    env = {**os.environ, "GROFF_NO_SGR": "1", "LC_ALL": "C.UTF-8"}
    # -rcR=1: one continuous page (no page headers mid-text); -rLL=400n: lines long enough that a paragraph is one
    # line; -P-cbou: no overstrike, bold, overline or underline sequences; -t: tables (tbl) as text. The page goes
    # in on stdin with its file-reading requests removed: a document cannot pull /etc/passwd into the corpus.
    out = _run_tool(["groff", "-t", "-man", "-Tutf8", "-P-cbou", "-rcR=1", "-rLL=400n", "-rHY=0", "-"], "man page",
                    timeout=MAN_TIMEOUT_S, env=env, input=_ROFF_FILE_REQUESTS.sub(b"", data)).decode("utf-8", errors="replace")
    lines = [ln.rstrip() for ln in out.splitlines()]
    body = [i for i, ln in enumerate(lines) if ln.strip()]
    titled = re.search(rb"^[.'][ \t]*TH\b", data, re.M) is not None  # the man macros' page layout only follows .TH
    if titled:
        lines = lines[body[0] + 1: body[-1]] if len(body) >= 2 else []  # the page header ("LS(1) ... LS(1)") and footer
    if not any(ln.strip() for ln in lines):
        raise ReadError("no text", "groff rendered no text")
    sections: list[Section] = []
    stack: list[tuple[int, str]] = []
    buf: list[str] = []

    def flush():
        text = _paragraphs("\n".join(buf))
        if text:
            sections.append(Section(headings=[h for _, h in stack], text=text))
        buf.clear()

    for ln in lines:
        indent = len(ln) - len(ln.lstrip(" "))
        if titled and ln.strip() and indent in (0, 3) and len(ln.strip()) < 120:
            flush()
            level = 1 if indent == 0 else 2
            while stack and stack[-1][0] >= level:
                stack.pop()
            stack.append((level, " ".join(ln.split())))
            continue
        buf.append(ln[7:] if ln.startswith(" " * 7) else ln.strip() if titled else ln)
    flush()
    name = next((s.text.split("\n", 1)[0].strip() for s in sections if s.headings[:1] == ["NAME"]), None)
    return name, sections, "utf-8"


READERS = {"txt": read_txt, "md": read_md, "html": read_html, "pdf": read_pdf, "docx": read_docx, "rst": read_rst,
           "pod": read_pod, "man": read_man}
