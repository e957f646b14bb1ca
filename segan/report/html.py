"""The HTML both reports share: one self-contained page (inline CSS, images as ``data:`` URIs).

Nothing on a page is fetched: no CDN, no script, no external stylesheet or font, so a
report opens offline, from an e-mail attachment or an archive. Every piece of text that
comes from a file, a case name, a CSV cell or an MLflow run goes through :func:`esc`.
"""

from __future__ import annotations

import base64
import html
from pathlib import Path
from typing import Iterable, Sequence

_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 1.5em; color: #1d1d1f;
       background: #fff; }
h1 { font-size: 1.5em; margin-bottom: .2em; } h2 { font-size: 1.2em; margin-top: 1.6em; }
p.sub { color: #555; margin-top: 0; }
table { border-collapse: collapse; font-size: 13px; }
th, td { border: 1px solid #ccc; padding: 4px 7px; vertical-align: top; text-align: left; }
th { background: #f1f1f4; position: sticky; top: 0; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
tr.failed td { background: #fde8e8; } tr.flagged td { background: #fff6dd; }
span.flag { display: inline-block; background: #e0a100; color: #fff; border-radius: 3px; padding: 0 5px;
            margin: 1px; font-size: 12px; }
span.flag.failed { background: #c62828; }
span.ok { color: #2e7d32; }
img.slices { width: 480px; max-width: none; display: block; }
img.fig { max-width: 100%; display: block; margin: .4em 0; }
.gallery { display: flex; flex-wrap: wrap; gap: 12px; }
.gallery figure { margin: 0; max-width: 640px; } .scroll { overflow-x: auto; max-width: 100%; } .gallery figcaption { font-size: 12px; color: #444; }
.legend span { display: inline-block; padding: 0 6px; margin-right: 6px; border-left: 14px solid; }
.msg { font-size: 12px; color: #444; max-width: 240px; overflow-wrap: anywhere; margin-top: 3px; }
code { font-size: 12px; }
"""


def esc(value: object) -> str:
    """Any value as HTML text (quotes escaped too, so it is also safe inside an attribute)."""
    return html.escape("" if value is None else str(value), quote=True)


def png_data_uri(data: bytes) -> str:
    """PNG bytes -> ``data:image/png;base64,...`` (the image travels inside the page)."""
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def img(data: bytes | None, alt: str, cls: str = "fig") -> str:
    """An ``<img>`` holding ``data`` (PNG bytes); a short note when there is no image."""
    if not data:
        return f'<span class="msg">no image ({esc(alt)})</span>'
    return f'<img class="{esc(cls)}" alt="{esc(alt)}" src="{png_data_uri(data)}">'


def table(header: Sequence[str], rows: Iterable[Sequence[str]], row_attrs: Iterable[str] | None = None,
          raw: bool = False) -> str:
    """A table; cells are escaped unless ``raw`` (then the caller has built escaped HTML)."""
    cell = (lambda c: c) if raw else esc
    head = "".join(f"<th>{esc(h)}</th>" for h in header)
    attrs = list(row_attrs) if row_attrs is not None else None
    body = []
    for i, row in enumerate(rows):
        attr = f" {attrs[i]}" if attrs else ""
        body.append(f"<tr{attr}>" + "".join(f"<td>{cell(c)}</td>" for c in row) + "</tr>")
    return f"<div class=\"scroll\"><table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table></div>"


def page(title: str, subtitle: str, sections: Sequence[str]) -> str:
    """The whole document: ``title`` and ``subtitle`` are text (escaped), ``sections`` HTML."""
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\"><title>{esc(title)}</title>"
            f"<style>{_CSS}</style></head><body><h1>{esc(title)}</h1><p class=\"sub\">{esc(subtitle)}</p>"
            + "\n".join(sections) + "\n</body></html>\n")


def write_page(path: Path, text: str) -> Path:
    """Write the page atomically (a reader never sees half a report)."""
    from segan.io_utils import atomic_write_text

    atomic_write_text(path, text)
    return path
