"""One document model of a run's report, rendered twice: as markdown (``report.md``,
``specs/<name>.md``, ...) and as static HTML (the same pages as ``.html``: sortable tables,
folded sections, figures inline, no server). Report builders make pages of these blocks and
never write markup; every string in a block is plain text (untrusted: a spec's or a worker's),
escaped by the renderer that writes it.

Pages are named by an id (``report``, ``specs/small_cnn``); a ``Link`` names a page id and an
anchor, and each renderer turns it into a relative path with its own extension.
"""

from __future__ import annotations

import html
import posixpath
import re
from dataclasses import dataclass, field
from urllib.parse import quote


# ------------------------------------------------------------------------------ the model

@dataclass
class Code:
    """Inline code (a name, a value, an API)."""
    text: str


@dataclass
class Strong:
    text: str


@dataclass
class Link:
    """A link to a page of the run (its id; None: this page) and an anchor on it."""
    text: str
    page: str | None = None
    anchor: str = ""
    #: the page in the other rendering (the HTML view from markdown and back); an empty
    #: ``text`` is that file's name
    alternate: bool = False


#: inline content: plain text, or a list of plain strings, Code, Strong and Link
Inline = "str | Code | Strong | Link | list"


@dataclass
class Cell:
    """A table cell: its content, a sort key (numbers sort as numbers), bold (the best of its
    row), and ``muted`` (a value that is not what its column says: not ranked)."""
    content: object
    sort: float | str | None = None
    bold: bool = False
    muted: bool = False


@dataclass
class Table:
    header: list
    rows: list                    # of lists of str / Cell / inline content
    sortable: bool = True


@dataclass
class Paragraph:
    content: object


@dataclass
class Bullets:
    items: list                   # each an inline content


@dataclass
class Figure:
    src: str                      # a path relative to the run directory
    alt: str


@dataclass
class CodeBlock:
    text: str


@dataclass
class Section:
    """A titled part of a page; ``folded`` ones are collapsed (``<details>``) with ``summary``
    (one line) shown."""
    title: str
    blocks: list
    anchor: str = ""
    folded: bool = False
    summary: object = None


@dataclass
class Page:
    id: str                       # "report", "specs/small_cnn": the path without extension
    title: str
    blocks: list = field(default_factory=list)


def anchor_of(text: str) -> str:
    """A stable anchor from a title: lower case, runs of other characters as one hyphen."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "section"


def relative(from_page: str, to_page: str, ext: str) -> str:
    """The relative path from one page to another, with the renderer's extension."""
    return posixpath.relpath(to_page + ext, posixpath.dirname(from_page) or ".")


def relative_file(from_page: str, path: str) -> str:
    """A run-relative file (a figure) as seen from a page."""
    return posixpath.relpath(path, posixpath.dirname(from_page) or ".")


def plain(content) -> str:
    """Inline content as plain text (sorting, alt texts, tests)."""
    if isinstance(content, Cell):
        return plain(content.content)
    if isinstance(content, list):
        return "".join(plain(c) for c in content)
    if isinstance(content, (Code, Strong, Link)):
        return content.text
    return "" if content is None else str(content)


# ------------------------------------------------------------------------------ markdown

_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]+")
_MD_ESCAPES = {"\\": "\\\\", "`": "\\`", "|": "\\|", "[": "\\[", "]": "\\]", "#": "\\#",
               "<": "&lt;", ">": "&gt;", "&": "&amp;"}
#: characters of one untrusted string in a report (a spec's description is at most 10,000;
#: a worker's error text may be anything up to a record's size)
ESCAPE_LIMIT = 10_000


def clip(text, limit: int = ESCAPE_LIMIT) -> str:
    text = str(text)
    if len(text) > limit:
        text = f"{text[:limit]} … ({len(text) - limit:,} more characters)"
    return _CONTROL.sub(" ", text)


def md_escape(text, limit: int = ESCAPE_LIMIT) -> str:
    """Untrusted text as inert inline markdown: one line, no code spans, links, emphasis,
    HTML, table pipes or headings, and at most ``limit`` characters of it."""
    return "".join(_MD_ESCAPES.get(ch, ch) for ch in clip(text, limit))


class Markdown:
    """Renders pages as GitHub-flavoured markdown."""
    ext = ".md"

    def __init__(self, page: Page):
        self.page = page

    def inline(self, c) -> str:
        if isinstance(c, list):
            return "".join(self.inline(x) for x in c)
        if isinstance(c, Cell):
            text = self.inline(c.content)
            return f"**{text}**" if c.bold and text else f"*{text}*" if c.muted and text \
                else text
        if isinstance(c, Code):
            text = clip(c.text)
            if not text or "`" in text or text != text.strip():
                return md_escape(text)
            return "`" + text.replace("|", "\\|") + "`"
        if isinstance(c, Strong):
            return f"**{md_escape(c.text)}**"
        if isinstance(c, Link):
            if c.alternate:
                href = quote(relative(self.page.id, c.page or self.page.id, Html.ext))
                return f"[{md_escape(c.text or href)}]({href})"
            href = "" if c.page is None or c.page == self.page.id else \
                quote(relative(self.page.id, c.page, self.ext))
            href += f"#{c.anchor}" if c.anchor else ""
            return f"[{md_escape(c.text)}]({href})"
        return md_escape("" if c is None else c)

    def table(self, t: Table) -> str:
        lines = ["| " + " | ".join(self.inline(h) for h in t.header) + " |",
                 "|" + "---|" * len(t.header)]
        lines += ["| " + " | ".join(self.inline(c) or " " for c in row) + " |" for row in t.rows]
        return "\n".join(lines) + "\n"

    def block(self, b, depth: int) -> str:
        if isinstance(b, Section):
            anchor = b.anchor or anchor_of(b.title)
            body = "".join(self.block(x, depth + 1) for x in b.blocks)
            if b.folded:
                summary = md_escape(b.title) + (f": {self.inline(b.summary)}"
                                                if b.summary else "")
                return (f'\n<details id="{anchor}"><summary>{summary}</summary>\n\n{body}\n'
                        "</details>\n")
            return f'\n{"#" * min(depth, 6)} <a id="{anchor}"></a>{md_escape(b.title)}\n\n{body}'
        if isinstance(b, Paragraph):
            return self.inline(b.content) + "\n\n"
        if isinstance(b, Bullets):
            return "".join(f"- {self.inline(i)}\n" for i in b.items) + "\n"
        if isinstance(b, Table):
            return self.table(b) + "\n"
        if isinstance(b, Figure):
            return f"![{md_escape(b.alt)}]({quote(relative_file(self.page.id, b.src))})\n\n"
        if isinstance(b, CodeBlock):
            longest = max((len(m) for m in re.findall(r"`+", b.text)), default=0)
            fence = "`" * max(3, longest + 1)
            lines = [_CONTROL.sub(" ", line) for line in b.text.splitlines()]
            return "\n".join([fence, *lines, fence]) + "\n\n"
        raise TypeError(f"not a block: {type(b).__name__}")

    def render(self) -> str:
        head = f"# {md_escape(self.page.title)}\n\n"
        return head + "".join(self.block(b, 2) for b in self.page.blocks).lstrip("\n")


def to_markdown(page: Page) -> str:
    text = Markdown(page).render()
    while "\n\n\n" in text:
        text = text.replace("\n\n\n", "\n\n")
    return text


# ------------------------------------------------------------------------------ HTML

STYLE = """
body{font:15px/1.45 system-ui,-apple-system,"Segoe UI",sans-serif;margin:0 auto;max-width:78rem;
padding:1rem 1.5rem;color:#1b1f24}
h1{font-size:1.45rem;margin:.2rem 0 .6rem}h2{font-size:1.2rem;margin:1.4rem 0 .5rem;
border-bottom:1px solid #d0d7de}h3{font-size:1.05rem;margin:1rem 0 .4rem}
table{border-collapse:collapse;margin:.4rem 0 .9rem;font-size:13px}
th,td{border:1px solid #d0d7de;padding:2px 7px;text-align:left;vertical-align:top}
th{background:#f3f5f7;position:sticky;top:0}
table.sortable th{cursor:pointer;user-select:none}
table.sortable th[aria-sort=ascending]::after{content:" \\25B2"}
table.sortable th[aria-sort=descending]::after{content:" \\25BC"}
td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
td.muted{color:#8c959f}div.wide{overflow-x:auto;max-width:100%}
code{background:#f3f5f7;padding:0 3px;border-radius:3px;font-size:92%}
details{margin:.3rem 0}summary{cursor:pointer;font-weight:600}
img{max-width:100%;height:auto;border:1px solid #eee}
pre{background:#f6f8fa;padding:.5rem;overflow:auto;font-size:12px}
nav.pages{font-size:13px;margin-bottom:.4rem}nav.pages a{margin-right:.8rem}
"""

#: column sorting: a click on a header sorts the body rows by that column (numbers by the
#: cell's data-sort value, else by text), again for the other direction
SCRIPT = """
document.querySelectorAll('table.sortable').forEach(function (table) {
  table.querySelectorAll('th').forEach(function (th, col) {
    th.addEventListener('click', function () {
      var asc = th.getAttribute('aria-sort') !== 'ascending';
      table.querySelectorAll('th').forEach(function (o) { o.removeAttribute('aria-sort'); });
      th.setAttribute('aria-sort', asc ? 'ascending' : 'descending');
      var body = table.tBodies[0];
      var rows = Array.prototype.slice.call(body.rows);
      function key(row) {
        var cell = row.cells[col];
        if (!cell) { return ''; }
        var s = cell.getAttribute('data-sort');
        if (s !== null && s !== '' && !isNaN(Number(s))) { return Number(s); }
        return (s !== null ? s : cell.textContent).trim().toLowerCase();
      }
      rows.sort(function (a, b) {
        var x = key(a), y = key(b);
        var d = (typeof x === 'number' && typeof y === 'number') ? x - y :
          String(x).localeCompare(String(y));
        return asc ? d : -d;
      });
      rows.forEach(function (r) { body.appendChild(r); });
    });
  });
});
"""


def _h(text) -> str:
    return html.escape(clip(text), quote=True)


class Html:
    """Renders pages as static HTML: one file per page, style and script inline."""
    ext = ".html"

    def __init__(self, page: Page, nav: list[tuple[str, str]] | None = None):
        self.page = page
        self.nav = nav or []

    def inline(self, c) -> str:
        if isinstance(c, list):
            return "".join(self.inline(x) for x in c)
        if isinstance(c, Cell):
            return self.inline(c.content)
        if isinstance(c, Code):
            return f"<code>{_h(c.text)}</code>"
        if isinstance(c, Strong):
            return f"<strong>{_h(c.text)}</strong>"
        if isinstance(c, Link):
            if c.alternate:
                href = quote(relative(self.page.id, c.page or self.page.id, Markdown.ext))
                return f'<a href="{_h(href)}">{_h(c.text or href)}</a>'
            href = "" if c.page is None or c.page == self.page.id else \
                quote(relative(self.page.id, c.page, self.ext))
            href += f"#{quote(c.anchor)}" if c.anchor else ""
            return f'<a href="{_h(href)}">{_h(c.text)}</a>'
        return _h("" if c is None else c)

    def cell(self, c, tag: str = "td") -> str:
        if not isinstance(c, Cell):
            return f"<{tag}>{self.inline(c)}</{tag}>"
        attrs = ""
        if c.sort is not None:
            attrs += f' data-sort="{_h(c.sort)}"'
        classes = [k for k, on in (("num", isinstance(c.sort, (int, float))),
                                   ("muted", c.muted)) if on]
        if classes:
            attrs += f' class="{" ".join(classes)}"'
        text = self.inline(c.content)
        return f"<{tag}{attrs}>{f'<strong>{text}</strong>' if c.bold else text}</{tag}>"

    def table(self, t: Table) -> str:
        head = "".join(f"<th>{self.inline(h)}</th>" for h in t.header)
        body = "".join("<tr>" + "".join(self.cell(c) for c in row) + "</tr>\n"
                       for row in t.rows)
        cls = ' class="sortable"' if t.sortable else ""
        return (f'<div class="wide"><table{cls}><thead><tr>{head}</tr></thead><tbody>\n{body}'
                "</tbody></table></div>\n")

    def block(self, b, depth: int) -> str:
        if isinstance(b, Section):
            anchor = _h(b.anchor or anchor_of(b.title))
            body = "".join(self.block(x, depth + 1) for x in b.blocks)
            if b.folded:
                summary = _h(b.title) + (f": {self.inline(b.summary)}" if b.summary else "")
                return f'<details id="{anchor}"><summary>{summary}</summary>\n{body}</details>\n'
            level = min(depth, 6)
            return f'<section id="{anchor}"><h{level}>{_h(b.title)}</h{level}>\n{body}</section>\n'
        if isinstance(b, Paragraph):
            return f"<p>{self.inline(b.content)}</p>\n"
        if isinstance(b, Bullets):
            return "<ul>" + "".join(f"<li>{self.inline(i)}</li>" for i in b.items) + "</ul>\n"
        if isinstance(b, Table):
            return self.table(b)
        if isinstance(b, Figure):
            src = quote(relative_file(self.page.id, b.src))
            return f'<p><img src="{_h(src)}" alt="{_h(b.alt)}"></p>\n'
        if isinstance(b, CodeBlock):
            return f"<pre>{_h(b.text) if len(b.text) < 100_000 else _h(b.text[:100_000])}</pre>\n"
        raise TypeError(f"not a block: {type(b).__name__}")

    def render(self) -> str:
        nav = "".join(f'<a href="{_h(quote(relative(self.page.id, pid, self.ext)))}">'
                      f"{_h(label)}</a>" for pid, label in self.nav if pid != self.page.id)
        body = "".join(self.block(b, 2) for b in self.page.blocks)
        return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
                "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
                f"<title>{_h(self.page.title)}</title><link rel=\"icon\" href=\"data:,\">"
                f"<style>{STYLE}</style></head>\n<body>\n"
                + (f'<nav class="pages">{nav}</nav>\n' if nav else "")
                + f"<h1>{_h(self.page.title)}</h1>\n{body}<script>{SCRIPT}</script>\n"
                "</body></html>\n")


def to_html(page: Page, nav: list[tuple[str, str]] | None = None) -> str:
    return Html(page, nav).render()
