"""``raydistill report``: an HTML report (one self-contained file) and a Markdown summary with PNG figures
of a sweep, finished or running, read from its directory on any storage (local, file://, s3://, gs://).

Modules: ``store`` (files through pyarrow's filesystems), ``sweepdata`` (the sweep's table and trial files),
``stats`` (importance, Pareto front, confidence intervals, paired tests), ``figures`` (matplotlib),
``sections`` (the report's content), ``html`` and ``markdown`` (the writers). Nothing imports the
training code."""

from __future__ import annotations

import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

HTML_NAME, MARKDOWN_NAME, FIGURES = "report.html", "report.md", "figures"


def default_output(location: str) -> Path:
    """Beside the sweep's files for a local sweep (STORAGE_PATH/NAME/report); ./NAME-report otherwise."""
    if "://" not in location or location.startswith("file://"):
        return Path(location.removeprefix("file://")).expanduser() / "report"
    from raydistill.report.store import display_location

    return Path(f"{display_location(location).rstrip('/').rsplit('/', 1)[-1]}-report")


def build_report(location: str, output: str | Path | None = None, metric: str | None = None,
                 mode: str | None = None) -> dict[str, Any]:
    """Read the sweep at ``location`` and write report.html, report.md and figures/*.png under ``output``."""
    from raydistill.report.html import render_html
    from raydistill.report.markdown import render_markdown
    from raydistill.report.sections import build_sections
    from raydistill.report.sweepdata import load_sweep

    start = time.perf_counter()
    data = load_sweep(location, metric=metric, mode=mode)
    sections = build_sections(data)
    out = Path(output) if output is not None else default_output(location)
    fig_dir = out / FIGURES
    fig_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for s in sections:
        for b in s.blocks:
            if b.kind == "figure":
                path = fig_dir / f"{b.figure.name}.png"
                path.write_bytes(b.figure.png)
                written.append(path)
    for stale in set(fig_dir.glob("*.png")) - set(written):  # figures of an earlier report of this sweep
        stale.unlink()
    title = f"Sweep report: {data.name}"
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    subtitle = (f"{len(data.table)} trials from {data.location}; ranked by {data.metric} ({data.mode}); "
                f"generated {stamp} by raydistill report.")
    (out / HTML_NAME).write_text(render_html(title, subtitle, sections), encoding="utf-8")
    (out / MARKDOWN_NAME).write_text(render_markdown(title, subtitle, sections, FIGURES), encoding="utf-8")
    return {"html": str(out / HTML_NAME), "markdown": str(out / MARKDOWN_NAME), "figures": [str(p) for p in written],
            "sections": [s.id for s in sections], "trials": len(data.table), "seconds": time.perf_counter() - start}
