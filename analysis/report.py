"""The report: every section's answer, tables and figures, as Markdown (PNGs beside it) and one self-contained HTML file."""
from __future__ import annotations

import base64
import html
from pathlib import Path

import markdown_it

from analysis.sections import Section, markdown_table

MANIFEST = ".report-files"  # the files the last report wrote in its folder: gone before the next report writes


def save(sections: list[Section], out: Path) -> list[Path]:
    """Write figures (PNG), tables (CSV and Markdown), after removing the previous report's files (a section it drew may
    not be drawn now); return every file written."""
    out.mkdir(parents=True, exist_ok=True)
    for path in report_files(out):
        path.unlink(missing_ok=True)
    written = []
    for section in sections:
        for name, fig in section.figures.items():
            path = out / f"{name}.png"
            fig.savefig(path, dpi=90, bbox_inches="tight")
            written.append(path)
        for name, table in section.tables.items():
            table.to_csv(out / f"{name}.csv", index=False)
            (out / f"{name}.md").write_text(markdown_table(table))
            written += [out / f"{name}.csv", out / f"{name}.md"]
    return written


def report_files(out: Path) -> list[Path]:
    """The files the last report wrote in out (none if it holds no report)."""
    listed = out / MANIFEST
    return [out / name for name in listed.read_text().splitlines()] if listed.is_file() else []


def keep_manifest(out: Path, files: list[Path]) -> None:
    """Note which files this report wrote, so the next one into the folder removes exactly those."""
    (out / MANIFEST).write_text("".join(f"{path.name}\n" for path in files))


def markdown(title: str, sections: list[Section], skipped: dict[str, str], source: str) -> str:
    """The Markdown twin: answers, tables, figure links."""
    parts = [f"# {title}", source]
    for s in sections:
        parts += [f"## {s.title}", s.text]
        parts += [markdown_table(t) for n, t in s.tables.items() if not n.endswith("_values")]
        parts += [f"![{n}]({n}.png)" for n in s.figures]
    if skipped:
        parts += ["## Not drawn"] + [f"- **{name}**: {why}" for name, why in skipped.items()]
    return "\n\n".join(parts) + "\n"


def to_html(md_text: str, out: Path) -> str:
    """The Markdown rendered to one HTML page with every PNG embedded as a data URI."""
    body = markdown_it.MarkdownIt("commonmark").enable("table").render(md_text)
    for png in out.glob("*.png"):
        data = base64.b64encode(png.read_bytes()).decode()
        body = body.replace(f'src="{png.name}"', f'src="data:image/png;base64,{data}"')
    style = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto;line-height:1.45}"
             "table{border-collapse:collapse;font-size:0.85em}td,th{border:1px solid #ccc;padding:3px 6px}"
             "img{max-width:100%}")
    title = html.escape(md_text.splitlines()[0].lstrip("# "))
    return f"<!doctype html><html><head><meta charset='utf-8'><title>{title}</title><style>{style}</style></head><body>{body}</body></html>"
