"""The Markdown summary: the same sections, tables as pipe tables (pandas/tabulate), figures as PNG files
beside it (``figures/<name>.png``), for papers, READMEs and pull requests."""

from __future__ import annotations

from raydistill.report.sections import Section


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render_markdown(title: str, subtitle: str, sections: list[Section], figure_dir: str = "figures") -> str:
    out = [f"# {title}", "", subtitle, ""]
    out += [f"{i}. [{s.title}](#{s.id})" for i, s in enumerate(sections, 1)] + [""]
    for s in sections:
        out += [f'<a id="{s.id}"></a>', "", f"## {s.title}", "", f"*How to read it:* {s.how_to_read}", ""]
        for b in s.blocks:
            if b.kind == "text":
                out += [b.text, ""]
            elif b.kind == "table":
                table = b.table.rename(columns=lambda c: _cell(str(c))).map(lambda v: _cell(str(v)))
                out += [table.to_markdown(index=False, disable_numparse=True), ""]
            elif b.kind == "figure":
                out += [f"![{b.figure.caption}]({figure_dir}/{b.figure.name}.png)", "", f"*{b.figure.caption}*", ""]
    return "\n".join(out)
