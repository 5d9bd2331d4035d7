"""A report as a list of blocks, rendered to Markdown and to self-contained HTML with the same content."""

from __future__ import annotations

import html
import re
from dataclasses import dataclass, field
from typing import Any

_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; max-width: 1100px; margin: 2em auto;
       padding: 0 1em; color: #222; line-height: 1.45; }
h1 { border-bottom: 2px solid #ddd; padding-bottom: .2em; }
h2 { margin-top: 1.8em; border-bottom: 1px solid #eee; }
table { border-collapse: collapse; margin: .8em 0; font-size: .9em; }
th, td { border: 1px solid #ccc; padding: .25em .6em; vertical-align: top; }
th { background: #f3f3f3; text-align: left; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
tr.partial td { background: #fff6e0; }
code { background: #f3f3f3; padding: 0 .2em; border-radius: 3px; }
figure { margin: 1em 0; }
figure img { max-width: 100%; border: 1px solid #eee; }
figcaption { font-size: .9em; color: #555; }
""".strip()

_NUMBER = re.compile(r"^-?(\d+\.?\d*|\.\d+)(e[-+]?\d+)?$|^-?inf$")


def _inline_html(text: str) -> str:
    """Escape, then `code` spans and [text](href) links."""
    out = html.escape(text)
    out = re.sub(r"`([^`]+)`", r"<code>\1</code>", out)
    return re.sub(r"\[([^\]]+)\]\(([^)\s]+)\)", r'<a href="\2">\1</a>', out)


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


@dataclass
class Document:
    title: str
    blocks: list[tuple[str, Any]] = field(default_factory=list)

    def heading(self, text: str, level: int = 2) -> None:
        self.blocks.append(("heading", (level, text)))

    def paragraph(self, text: str) -> None:
        self.blocks.append(("paragraph", text))

    def bullets(self, items: list[str]) -> None:
        self.blocks.append(("bullets", list(items)))

    def table(self, headers: list[str], rows: list[list[str]], highlight: list[bool] | None = None) -> None:
        """Cells are already formatted text; `highlight` marks rows (partial runs) in HTML."""
        self.blocks.append(("table", (headers, rows, highlight or [False] * len(rows))))

    def figure(self, src: str, alt: str, caption: str) -> None:
        self.blocks.append(("figure", (src, alt, caption)))

    def markdown(self) -> str:
        out = [f"# {self.title}", ""]
        for kind, value in self.blocks:
            if kind == "heading":
                level, text = value
                out += ["#" * level + " " + text, ""]
            elif kind == "paragraph":
                out += [value, ""]
            elif kind == "bullets":
                out += [f"- {item}" for item in value] + [""]
            elif kind == "table":
                headers, rows, _ = value
                out.append("| " + " | ".join(_md_cell(h) for h in headers) + " |")
                aligns = ["---:" if _is_numeric_column(rows, i) else "---" for i in range(len(headers))]
                out.append("|" + "|".join(aligns) + "|")
                out += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in rows]
                out.append("")
            elif kind == "figure":
                src, alt, caption = value
                out += [f"![{alt}]({src})", "", caption, ""]
        return "\n".join(out).rstrip() + "\n"

    def html(self) -> str:
        body = [f"<h1>{html.escape(self.title)}</h1>"]
        for kind, value in self.blocks:
            if kind == "heading":
                level, text = value
                body.append(f"<h{level}>{_inline_html(text)}</h{level}>")
            elif kind == "paragraph":
                body.append(f"<p>{_inline_html(value)}</p>")
            elif kind == "bullets":
                body.append("<ul>" + "".join(f"<li>{_inline_html(i)}</li>" for i in value) + "</ul>")
            elif kind == "table":
                headers, rows, highlight = value
                numeric = [_is_numeric_column(rows, i) for i in range(len(headers))]
                head = "".join(f"<th>{_inline_html(h)}</th>" for h in headers)
                lines = []
                for row, marked in zip(rows, highlight, strict=True):
                    cells = "".join(
                        f'<td class="num">{_inline_html(c)}</td>' if numeric[i] else f"<td>{_inline_html(c)}</td>"
                        for i, c in enumerate(row)
                    )
                    lines.append(f'<tr class="partial">{cells}</tr>' if marked else f"<tr>{cells}</tr>")
                body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(lines)}</tbody></table>")
            elif kind == "figure":
                src, alt, caption = value
                body.append(
                    f'<figure><img src="{html.escape(src)}" alt="{html.escape(alt)}">'
                    f"<figcaption>{_inline_html(caption)}</figcaption></figure>"
                )
        return (
            "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            f"<title>{html.escape(self.title)}</title>\n<style>\n{_CSS}\n</style>\n</head>\n<body>\n"
            + "\n".join(body)
            + "\n</body>\n</html>\n"
        )


def _is_numeric_column(rows: list[list[str]], i: int) -> bool:
    cells = [r[i] for r in rows if r[i] not in ("", "-")]
    return bool(cells) and all(_NUMBER.match(c) for c in cells)
