"""Self-contained report pages: Markdown tables, PNGs inlined as data URIs, one HTML file.

The privacy statement and the sites' explanation reports are read where there may be no
network (a hospital's machine) and are archived as single files: nothing a page shows may
be fetched from elsewhere.
"""

from __future__ import annotations

import base64

HTML_STYLE = """
body { font-family: system-ui, sans-serif; max-width: 60rem; margin: 2rem auto; color: #222;
       line-height: 1.45; padding: 0 1rem; }
table { border-collapse: collapse; margin: 0.5rem 0 1rem; font-size: 0.9rem; }
th, td { border: 1px solid #bbb; padding: 0.25rem 0.5rem; text-align: right; }
th { background: #eee; } td:first-child, th:first-child { text-align: left; }
img { max-width: 100%; } code { background: #f3f3f3; padding: 0 0.2rem; }
"""


def md_table(header: list[str], rows: list[list[str]]) -> str:
    """A GitHub-flavoured Markdown table (Python-Markdown's ``tables`` extension reads it)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def png_data_uri(png: bytes) -> str:
    """A PNG as an ``<img src>`` the page carries inside itself."""
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def to_html(markdown_text: str, title: str) -> str:
    """One self-contained page: the Markdown rendered, styles inline, no external requests."""
    import markdown

    body = markdown.markdown(markdown_text, extensions=["tables"])
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{title}</title><style>{HTML_STYLE}</style></head>"
        f"<body>\n{body}\n</body></html>\n"
    )
