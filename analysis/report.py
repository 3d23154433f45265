"""The findings as matplotlib figures (PNG) and one self-contained HTML page (figures embedded as
data URIs, no scripts, no network), readable offline."""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display; set before pyplot is imported
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from analysis.findings import Finding, all_findings  # noqa: E402
from moe_core.files import write_text  # noqa: E402

_STYLE = """
body { font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto; color: #222; }
table { border-collapse: collapse; margin: 0.6em 0; font-size: 0.85em; }
td, th { border: 1px solid #ccc; padding: 3px 7px; text-align: left; }
.reproduced { background: #d8f3dc; } .contradicted { background: #ffd6d6; } .inconclusive { background: #eee; }
.fit { background: #e3ecff; } img { max-width: 100%; border: 1px solid #ddd; } h2 { margin-top: 2em; }
.not-tested { background: #f8f8f8; color: #777; }
"""


def _figure(finding: Finding) -> bytes | None:
    if finding.plot is None:
        return None
    fig = plt.figure(figsize=(7.5, 4.2), dpi=110)
    try:
        finding.plot(fig)
        fig.suptitle(finding.title, fontsize=10)
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png")
        return buf.getvalue()
    finally:
        plt.close(fig)


def _table_html(df: pd.DataFrame, limit: int = 40) -> str:
    if df.empty:
        return ""
    shown = df.head(limit)
    more = f"<p>... {len(df) - limit} more rows</p>" if len(df) > limit else ""
    return shown.to_html(index=False, float_format=lambda x: f"{x:.4g}", border=0, na_rep="") + more


def _checks_html(finding: Finding) -> str:
    """The finding's sub-claims, one row each with its own verdict, effect and numbers."""
    rows = "".join(
        f'<tr class="{c.verdict.replace(" ", "-")}"><td>{html.escape(c.claim)}</td>'
        f"<td>{'required' if c.required else 'supporting'}</td><td>{c.verdict}</td>"
        f"<td>{'' if c.effect is None else f'{c.effect:+.4g}'}</td><td>{html.escape(c.detail)}</td></tr>"
        for c in finding.checks
    )
    head = "<tr><th>sub-claim</th><th>role</th><th>verdict</th><th>effect</th><th>evidence</th></tr>"
    return f"<table>{head}{rows}</table>"


def _verdicts_line(finding: Finding) -> str:
    """The overview's evidence cell: each sub-claim's verdict (the numbers are in its section)."""
    if not finding.checks:
        return finding.summary
    return "; ".join(f"{c.claim}: {c.verdict}" for c in finding.checks)


def write_report(trials: pd.DataFrame, steps: pd.DataFrame, out_dir: str | Path, title: str) -> Path:
    """Figures `out_dir/<finding>.png` and `out_dir/index.html`; returns the page's path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    findings = all_findings(trials, steps)
    counts = trials["status"].value_counts().to_dict() if "status" in trials else {}
    rows = "".join(
        f'<tr class="{f.verdict}"><td><a href="#{f.key}">{html.escape(f.title)}</a></td><td>{f.verdict}</td>'
        f"<td>{html.escape(_verdicts_line(f))}</td></tr>" for f in findings
    )
    sections = []
    for f in findings:
        png = _figure(f)
        img = ""
        if png:
            (out / f"{f.key}.png").write_bytes(png)
            img = f'<img alt="{html.escape(f.title)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'
        sections.append(
            f'<h2 id="{f.key}">{html.escape(f.title)}: <span class="{f.verdict}">{f.verdict}</span></h2>'
            f"<p><b>Claim.</b> {html.escape(f.claim)}</p>"
            + (_checks_html(f) if f.checks else f"<p><b>Evidence.</b> {html.escape(f.summary)}</p>")
            + f"{img}{_table_html(f.table)}"
        )
    page = (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{_STYLE}</style></head><body><h1>{html.escape(title)}</h1>"
        f"<p>{len(trials)} trials ({', '.join(f'{k} {v}' for k, v in counts.items())}). Verdicts compare trials that differ "
        f"only in the factor at hand and judge effects against the seed noise where seeds repeat "
        f"(rules in <code>analysis/findings/</code>).</p>"
        f"<table><tr><th>finding</th><th>verdict</th><th>evidence</th></tr>{rows}</table>"
        + "".join(sections) + "</body></html>"
    )
    path = out / "index.html"
    write_text(path, page)
    return path
