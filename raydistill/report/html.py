"""The self-contained HTML report: one file, figures embedded as base64 PNG, inline CSS, no script and no
external resource, so it opens offline from a file, an e-mail or an artifact store."""

from __future__ import annotations

import base64
import html

from raydistill.report.sections import Section

CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 2em auto; max-width: 1200px;
       padding: 0 1em; color: #222; line-height: 1.45; }
h1 { font-size: 1.6em; } h2 { font-size: 1.25em; border-bottom: 1px solid #ddd; padding-bottom: .2em; margin-top: 2em; }
nav ol { columns: 2; } p.how { color: #555; font-size: .92em; background: #f6f8fa; padding: .5em .8em;
       border-left: 3px solid #bbb; }
.scroll { overflow-x: auto; margin: .6em 0; }
table { border-collapse: collapse; font-size: .82em; } th, td { border: 1px solid #ddd; padding: 2px 6px;
       text-align: right; white-space: nowrap; } th { background: #f0f0f0; }
tr:nth-child(even) td { background: #fafafa; }
figure { margin: 1em 0; } figure img { max-width: 100%; height: auto; border: 1px solid #eee; }
figcaption { font-size: .85em; color: #555; }
"""


def render_html(title: str, subtitle: str, sections: list[Section]) -> str:
    esc = html.escape
    out = ["<!DOCTYPE html>", '<html lang="en">', "<head>", '<meta charset="utf-8"/>',
           '<meta name="viewport" content="width=device-width, initial-scale=1"/>', f"<title>{esc(title)}</title>",
           f"<style>{CSS}</style>", "</head>", "<body>", f"<h1>{esc(title)}</h1>", f"<p>{esc(subtitle)}</p>",
           "<nav><ol>"]
    out += [f'<li><a href="#{s.id}">{esc(s.title)}</a></li>' for s in sections]
    out.append("</ol></nav>")
    for s in sections:
        out += [f'<section id="{s.id}">', f"<h2>{esc(s.title)}</h2>", f'<p class="how">{esc(s.how_to_read)}</p>']
        for b in s.blocks:
            if b.kind == "text":
                out.append(f"<p>{esc(b.text)}</p>")
            elif b.kind == "table":
                out.append('<div class="scroll">' + b.table.to_html(index=False, border=0, escape=True) + "</div>")
            elif b.kind == "figure":
                data = base64.b64encode(b.figure.png).decode("ascii")
                out.append(f'<figure id="fig-{b.figure.name}"><img alt="{esc(b.figure.caption)}" '
                           f'src="data:image/png;base64,{data}"/><figcaption>{esc(b.figure.caption)}</figcaption>'
                           "</figure>")
        out.append("</section>")
    out += ["</body>", "</html>"]
    return "\n".join(out) + "\n"
