"""The blocks a report is made of: what :mod:`workflows.report.document` builds and
:mod:`workflows.report.render` writes as HTML or Markdown. Every string in a block is plain text
(user strings included); the renderers escape it."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Heading:
    """A section title."""

    text: str


@dataclass(frozen=True)
class Text:
    """A paragraph."""

    text: str


@dataclass(frozen=True)
class Table:
    """A table of text cells with a caption. A row of a single cell in a table of several
    columns is a section title spanning the whole row (the paper's "One-step generation …")."""

    header: list[str]
    rows: list[list[str]]
    caption: str = ""


@dataclass(frozen=True)
class Image:
    """A PNG figure: embedded in the HTML, written beside the Markdown as ``name``."""

    name: str
    png: bytes
    caption: str


@dataclass(frozen=True)
class Code:
    """Preformatted text (configuration, versions)."""

    text: str


Block = Heading | Text | Table | Image | Code
