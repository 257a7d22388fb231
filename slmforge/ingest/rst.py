"""reStructuredText / Sphinx sources -> heading-structured sections, with docutils (the reference rST parser).

Sphinx adds directives and roles docutils does not know (`.. method::`, `:func:`); plain docutils turns each into an
error message and a copy of the markup. Here they are handled the way Sphinx shows them, without Sphinx itself (a
large dependency that builds whole projects, not single files):
  - object descriptions (`.. function::`, `.. method::`, `.. class::`, `.. attribute::`, `py:`/`c:` domains, ...)
    become their signature line, qualified by the current module and class as Sphinx shows it, then their content;
  - `versionadded`/`versionchanged`/`deprecated`/`seealso` become their sentence; code directives stay code;
  - navigation and build-only directives (`toctree`, `index`, `highlight`, `literalinclude`, ...) are dropped;
  - any other directive keeps its content; every role becomes its text (`:func:`~os.path.join`` -> `join`,
    `:ref:`the guide <label>`` -> `the guide`).
Names not known in advance are registered as permissive handlers before parsing (docutils looks them up in its
registries), so no directive or role is ever an error. File inclusion and raw passthrough are disabled: a document
cannot make the reader open another file.
"""

from __future__ import annotations

import io
import re

from slmforge.records import Section

# Sphinx object descriptions: rendered as "signature" + content
_OBJECT_TYPES = {"function", "method", "class", "attribute", "data", "exception", "decorator", "decoratormethod",
                 "classmethod", "staticmethod", "coroutinefunction", "coroutinemethod", "abstractmethod", "property",
                 "describe", "object", "option", "cmdoption", "envvar", "opcode", "pdbcommand", "type", "member", "macro",
                 "var", "struct", "union", "enum", "enumerator", "namespace", "concept", "awaitablefunction",
                 "awaitablemethod", "fixture", "confval", "setting", "event", "role", "directive"}
_VERSION_NOTES = {"versionadded": "New in version", "versionchanged": "Changed in version",
                  "deprecated": "Deprecated since version", "versionremoved": "Removed in version",
                  "deprecated-removed": "Deprecated since version"}
_CODE = {"code-block", "sourcecode", "doctest", "testcode", "testoutput", "testsetup", "testcleanup", "productionlist",
         "ipython", "jupyter-execute"}
_DROP = {"toctree", "index", "highlight", "literalinclude", "tabularcolumns", "autosummary", "automodule", "autoclass",
         "autofunction", "automethod", "autodata", "autoattribute", "currentmodule", "module", "moduleauthor",
         "sectionauthor", "codeauthor", "default-role", "default-domain", "program", "only-html", "raw", "include",
         "image", "figure", "graphviz", "digraph", "graph", "inheritance-diagram", "plot", "meta", "cssclass",
         "rst-class", "sidebar-toc", "contents", "sectnum", "header", "footer", "audit-event-table", "miscnews"}
_DIRECTIVE_RE = re.compile(r"^\s*\.\.\s+([A-Za-z0-9][\w.:+-]*)\s?::", re.M)
_ROLE_RE = re.compile(r"(?<![\w`]):([A-Za-z0-9](?:[-_.:+]?[A-Za-z0-9]+)*):`")


def _role_text(text: str) -> str:
    """What Sphinx shows for a role's content: `title <target>` -> title, `~a.b.c` -> c, `!x` -> x."""
    m = re.match(r"(?s)^(.*?)\s*<[^<>]+>$", text)
    if m and m.group(1):
        return m.group(1)
    text = text.lstrip("!")
    if text.startswith("~"):
        text = text[1:].rsplit(".", 1)[-1]
    return text


def _generic_role(name, rawtext, text, lineno, inliner, options=None, content=None):
    from docutils import nodes
    from docutils.utils import unescape

    return [nodes.literal(rawtext, _role_text(unescape(text)))], []


class _AnyOptions(dict):
    """An option_spec that accepts every option (Sphinx directives have many that do not matter for the text)."""

    def __missing__(self, key):
        from docutils.parsers.rst import directives

        return directives.unchanged


def _directive_classes():
    from docutils import nodes
    from docutils.parsers.rst import Directive

    class Generic(Directive):
        """Unknown directive: keep its content (parsed as rST), drop its arguments."""

        optional_arguments = 1  # one argument holding the whole (possibly multi-line) signature or title
        final_argument_whitespace = True
        has_content = True
        option_spec = _AnyOptions(noindex=None)

        def run(self):
            if self.name in _DROP:
                return []
            if not self.content:
                return []
            box = nodes.container()
            self.state.nested_parse(self.content, self.content_offset, box)
            return [box]

    class Code(Generic):
        def run(self):
            text = "\n".join(self.content)
            if self.name == "productionlist" and not text:
                text = " ".join(self.arguments)
            return [nodes.literal_block(text, text)] if text.strip() else []

    class VersionNote(Generic):
        def run(self):
            version, rest = ((self.arguments[0] if self.arguments else "").split(None, 1) + ["", ""])[:2]
            rest = " ".join(rest.split())
            head = f"{_VERSION_NOTES[self.name.split(':')[-1]]} {version}"
            box = nodes.container()
            if self.content:
                self.state.nested_parse(self.content, self.content_offset, box)
            if rest:  # the note's text on the directive line, with its inline markup
                inline, _ = self.state.inline_text(rest, self.lineno)
                return [nodes.paragraph(rest, "", nodes.Text(head + ": "), *inline), *box.children]
            first = box.children[0] if box.children and isinstance(box.children[0], nodes.paragraph) else None
            if first is not None:  # "Changed in version 3.3: <the first paragraph>"
                first.insert(0, nodes.Text(head + ": "))
                return [box]
            return [nodes.paragraph(head, head + "."), *box.children]

    class SeeAlso(Generic):
        def run(self):
            box = nodes.container()
            text = " ".join(self.arguments)
            inline = self.state.inline_text(text, self.lineno)[0] if text else []
            box += nodes.paragraph(text, "", nodes.Text("See also: " if text else "See also:"), *inline)
            if self.content:
                self.state.nested_parse(self.content, self.content_offset, box)
            return [box]

    class Module(Generic):
        """`.. module::` / `.. currentmodule::`: nothing to show, but later signatures are qualified by it."""

        def run(self):
            self.state.document.slm_module = (self.arguments[0].split()[0] if self.arguments else "")
            if self.name == "module" and self.content:  # a synopsis-like body
                return Generic.run(self)
            return []

    class ObjectDescription(Generic):
        """`.. method:: name(args)`: the signature as Sphinx shows it, then the description."""

        def run(self):
            doc = self.state.document
            kind = self.name.split(":")[-1]
            module = self.options.get("module") or getattr(doc, "slm_module", "")
            owner = getattr(doc, "slm_class", "")
            lines = [s.strip() for s in "\n".join(self.arguments).replace("\\\n", " ").split("\n") if s.strip()]
            sigs = []
            for sig in lines:
                name = sig.split("(", 1)[0].split()[-1] if sig.split("(", 1)[0].split() else sig
                qualified = sig
                if kind in ("method", "attribute", "classmethod", "staticmethod", "property", "decoratormethod",
                            "coroutinemethod", "abstractmethod", "awaitablemethod") and owner and "." not in name:
                    qualified = f"{owner}.{sig}"
                elif kind in ("function", "class", "data", "exception", "decorator", "coroutinefunction",
                              "awaitablefunction") and module and not name.startswith(module + ".") and not owner:
                    qualified = f"{module}.{sig}"
                prefix = {"class": "class ", "exception": "exception ", "decorator": "@", "decoratormethod": "@",
                          "classmethod": "classmethod ", "staticmethod": "staticmethod ",
                          "coroutinefunction": "coroutine ", "coroutinemethod": "coroutine "}.get(kind, "")
                sigs.append(prefix + qualified)
            text = "\n".join(sigs)
            out = [nodes.literal_block(text, text)] if sigs else []
            if self.content:
                box = nodes.block_quote()
                saved = owner
                if kind in ("class", "exception") and lines:
                    first = lines[0].split("(", 1)[0].split()[-1]
                    doc.slm_class = first if "." in first or not module else f"{module}.{first}"
                try:
                    self.state.nested_parse(self.content, self.content_offset, box)
                finally:
                    doc.slm_class = saved
                out.append(box)
            return out

    return Generic, Code, VersionNote, SeeAlso, Module, ObjectDescription


_registered: dict[str, set[str]] = {"directive": set(), "role": set()}


def _register(text: str) -> None:
    """Give every directive and role the text names a permissive handler (docutils' own ones stay as they are)."""
    from docutils.parsers.rst import directives, roles
    from docutils.parsers.rst.languages import en

    Generic, Code, VersionNote, SeeAlso, Module, ObjectDescription = _directive_classes()
    for name in set(_DIRECTIVE_RE.findall(text)) | {"function", "method", "class", "code-block", "versionadded"}:
        key = name.lower()
        if key in _registered["directive"]:
            continue
        _registered["directive"].add(key)
        base = key.split(":")[-1]
        if key in en.directives and key not in ("class", "include", "raw", "image", "figure"):
            continue  # docutils' own (note, code, table, ...); its `class` means something else than Sphinx's
        if base in _OBJECT_TYPES:
            cls = ObjectDescription
        elif base in ("module", "currentmodule"):
            cls = Module
        elif base in _VERSION_NOTES:
            cls = VersionNote
        elif base == "seealso":
            cls = SeeAlso
        elif base in _CODE:
            cls = Code
        else:
            cls = Generic
        directives.register_directive(key, cls)
    for name in set(_ROLE_RE.findall(text)):
        key = name.lower()
        if key in _registered["role"] or key in roles._roles or key in en.roles:
            continue
        _registered["role"].add(key)
        roles.register_local_role(key, _generic_role)


SETTINGS = {
    "report_level": 5, "halt_level": 5, "warning_stream": io.StringIO(), "file_insertion_enabled": False,
    "raw_enabled": False, "doctitle_xform": False, "sectsubtitle_xform": False, "smart_quotes": False,
    "syntax_highlight": "none", "_disable_config": True, "input_encoding": "unicode", "line_length_limit": 100_000,
}


def parse_rst(text: str) -> tuple[str | None, list[Section]]:
    from docutils import nodes
    from docutils.core import publish_doctree

    _register(text)
    doctree = publish_doctree(text, settings_overrides={**SETTINGS, "warning_stream": io.StringIO()})
    sections: list[Section] = []
    stack: list[str] = []
    buf: list[str] = []

    def flush():
        if buf:
            sections.append(Section(headings=list(stack), text="\n\n".join(buf)))
            buf.clear()

    def inline(node) -> str:
        return re.sub(r"\s+", " ", node.astext()).strip()

    def blocks(node, prefix: str = "") -> None:
        """Append the text blocks of a body element to buf; `prefix` goes before the first one (list bullets)."""
        first = [prefix]

        def add(text: str):
            if text.strip():
                buf.append(first[0] + text)
                first[0] = ""

        for child in node.children if not isinstance(node, nodes.Text) else []:
            if isinstance(child, nodes.section):
                flush()
                title = child.next_node(nodes.title)
                stack.append(inline(title) if title is not None else "")
                blocks(child)
                flush()
                stack.pop()
            elif isinstance(child, (nodes.title, nodes.comment, nodes.target, nodes.substitution_definition,
                                    nodes.system_message, nodes.raw, nodes.pending, nodes.transition, nodes.image,
                                    nodes.problematic)) or isinstance(child, nodes.Invisible):
                continue
            elif isinstance(child, (nodes.literal_block, nodes.doctest_block)):
                add(child.astext().strip("\n"))
            elif isinstance(child, (nodes.paragraph, nodes.rubric, nodes.line, nodes.attribution, nodes.caption)):
                add(inline(child))
            elif isinstance(child, (nodes.bullet_list, nodes.enumerated_list)):
                for i, item in enumerate(child.children):
                    bullet = "- " if isinstance(child, nodes.bullet_list) else f"{i + 1}. "
                    blocks(item, first[0] + bullet)
                    first[0] = ""
            elif isinstance(child, nodes.definition_list):
                for item in child.children:
                    term = " : ".join(inline(t) for t in item.children if isinstance(t, (nodes.term, nodes.classifier)))
                    add(term)
                    for d in item.children:
                        if isinstance(d, nodes.definition):
                            blocks(d)
            elif isinstance(child, nodes.field_list):
                for field in child.children:
                    name = inline(field.children[0]) if field.children else ""
                    body = " ".join(inline(b) for b in field.children[1:])
                    add(f"{name}: {body}".strip())
            elif isinstance(child, nodes.option_list):
                for item in child.children:
                    opts = inline(item.children[0]) if item.children else ""
                    desc = " ".join(inline(d) for d in item.children[1:])
                    add(f"{opts}  {desc}".strip())
            elif isinstance(child, nodes.table):
                for row in child.findall(nodes.row):
                    add(" | ".join(inline(entry) for entry in row.children))
            elif isinstance(child, nodes.Admonition):
                label = child.tagname.replace("_", " ").capitalize() if child.tagname != "admonition" else ""
                title = child.next_node(nodes.title)
                head = inline(title) if title is not None and title.parent is child else label
                blocks(child, (head + ": ") if head else "")
            elif isinstance(child, (nodes.Element,)) and any(isinstance(c, nodes.Element) for c in child.children):
                blocks(child, first[0])  # containers: block quotes, compounds, topics, list items, line blocks
                first[0] = ""
            elif isinstance(child, nodes.Element):
                add(inline(child))

    blocks(doctree)
    flush()
    title = next((s.headings[0] for s in sections if s.headings), None)
    return title, sections
