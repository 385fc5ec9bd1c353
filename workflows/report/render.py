"""A report's blocks as a self-contained HTML page or as Markdown.

Every string is escaped: run names, labels, configuration values and URIs are user input. The
HTML page has an inline style, its figures as ``data:`` PNGs and no script; the Markdown links the
PNGs written beside it and shows the configuration in a fence long enough for any backticks in it.
"""

from __future__ import annotations

import base64
import html
import re

from workflows.report.blocks import Block, Code, Heading, Image, Text

_STYLE = """
body { font-family: sans-serif; margin: 2em; color: #222; max-width: 1400px; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 13px; }
th, td { border: 1px solid #ccc; padding: 3px 7px; text-align: right; }
th { background: #f0f0f0; }
td.text, th:first-child { text-align: left; }
th.section { background: #fafafa; font-style: italic; }
caption { caption-side: bottom; text-align: left; color: #555; font-size: 12px; padding-top: 4px; }
figure { margin: 1em 0 2em; } figcaption { color: #555; font-size: 12px; }
img { max-width: 100%; border: 1px solid #eee; }
pre { background: #f7f7f7; padding: 0.8em; overflow-x: auto; font-size: 12px; }
"""
_NUMBER = re.compile(r"^(–|[-+]?\d[\d.]*(e[-+]?\d+)?)$")
_MARKDOWN_SPECIAL = re.compile(r"([\\`*_\[\]|#])")


def _html_cell(cell: str) -> str:
    """A table cell: numbers right-aligned, text left-aligned."""
    kind = "" if _NUMBER.match(cell) else ' class="text"'
    return f"<td{kind}>{html.escape(cell)}</td>"


def _html_row(row: list[str], width: int) -> str:
    """A table row; a single cell in a wider table is a section title spanning the row."""
    if len(row) == 1 and width > 1:
        return f'<tr><th class="section" colspan="{width}">{html.escape(row[0])}</th></tr>'
    return "<tr>" + "".join(_html_cell(cell) for cell in row) + "</tr>"


def _html_block(block: Block) -> str:
    escape = html.escape
    if isinstance(block, Heading):
        return f"<h2>{escape(block.text)}</h2>"
    if isinstance(block, Text):
        return f"<p>{escape(block.text)}</p>"
    if isinstance(block, Code):
        return f"<pre>{escape(block.text)}</pre>"
    if isinstance(block, Image):
        data = base64.b64encode(block.png).decode("ascii")
        return (
            f'<figure><img alt="{escape(block.caption)}" src="data:image/png;base64,{data}">'
            f"<figcaption>{escape(block.caption)}</figcaption></figure>"
        )
    head = "".join(f"<th>{escape(cell)}</th>" for cell in block.header)
    body = "\n".join(_html_row(row, len(block.header)) for row in block.rows)
    return f"<table><caption>{escape(block.caption)}</caption>\n<tr>{head}</tr>\n{body}\n</table>"


def to_html(title: str, blocks: list[Block]) -> str:
    """A self-contained page: inline style, images as data URIs, no script."""
    body = "\n".join(_html_block(block) for block in blocks)
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{html.escape(title)}</title><style>{_STYLE}</style></head>\n"
        f"<body><h1>{html.escape(title)}</h1>\n{body}\n</body></html>\n"
    )


def markdown_text(text: str) -> str:
    """``text`` safe in Markdown: HTML escaped, Markdown punctuation backslashed, one line."""
    return _MARKDOWN_SPECIAL.sub(r"\\\1", html.escape(" ".join(str(text).split()), quote=False))


def _markdown_row(row: list[str], width: int) -> str:
    """A table row; a single cell in a wider table is a section title, in bold, the rest empty."""
    if len(row) == 1 and width > 1:
        return f"| **{markdown_text(row[0])}** |" + " |" * (width - 1)
    return "| " + " | ".join(markdown_text(cell) for cell in row) + " |"


def _markdown_block(block: Block) -> str:
    if isinstance(block, Heading):
        return f"## {markdown_text(block.text)}"
    if isinstance(block, Text):
        return markdown_text(block.text)
    if isinstance(block, Code):
        fence = "`" * max(3, 1 + max((len(run) for run in re.findall(r"`+", block.text)), default=0))
        return f"{fence}\n{block.text}\n{fence}"
    if isinstance(block, Image):
        return f"![{markdown_text(block.caption)}]({block.name})\n\n{markdown_text(block.caption)}"
    lines = [
        "| " + " | ".join(markdown_text(cell) for cell in block.header) + " |",
        "|" + "---|" * len(block.header),
        *(_markdown_row(row, len(block.header)) for row in block.rows),
    ]
    return "\n".join(lines) + f"\n\n{markdown_text(block.caption)}"


def to_markdown(title: str, blocks: list[Block]) -> str:
    return f"# {markdown_text(title)}\n\n" + "\n\n".join(_markdown_block(block) for block in blocks) + "\n"
