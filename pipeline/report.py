"""``gho2kvm report``: ``<workdir>/report.md`` and a self-contained ``report.html`` from receipts."""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

from pipeline import atomic, receipts
from pipeline.config import Config
from pipeline.tasks import chain

COLUMNS = ("image", "step", "status", "started", "finished", "seconds", "bytes read", "bytes written",
           "outputs", "warnings / error")


def rows(cfg: Config) -> list[dict[str, Any]]:
    out = []
    for img in cfg.images:
        for t in chain(str(cfg.path.absolute()), img.id):
            r = t.receipt()
            err = receipts.read(t.error_path)
            try:
                stale = t.stale_reason()
            except Exception as e:
                stale = str(e)
            failed = err is not None and (r is None or err.get("finished", "") >= r.get("finished", ""))
            if failed:
                status = "failed"
            elif r is not None and stale is None:
                status = "done"
            elif r is not None:
                status = "stale"
            else:
                status = "not run"
            src = err if failed and err else (r or {})
            notes = [str(err.get("error"))] if failed and err else list((r or {}).get("warnings", []))
            out.append({
                "image": img.id, "step": t.step, "status": status,
                "started": src.get("started", ""), "finished": src.get("finished", ""),
                "seconds": src.get("duration_s", ""),
                "bytes read": (r or {}).get("bytes_read", "") if not failed else "",
                "bytes written": (r or {}).get("bytes_written", "") if not failed else "",
                "outputs": ", ".join(o["path"] for o in (r or {}).get("outputs", {}).values()) if not failed
                else "",
                "warnings / error": "; ".join(notes),
            })
    return out


def _md_cell(v: Any) -> str:
    return str(v).replace("|", "\\|").replace("\n", " ")


def write_report(cfg: Config) -> tuple[Path, Path]:
    data = rows(cfg)
    workdir = cfg.images[0].workdir
    md = [f"# gho2kvm report — {cfg.path}", "", "| " + " | ".join(COLUMNS) + " |",
          "|" + "---|" * len(COLUMNS)]
    md += ["| " + " | ".join(_md_cell(r[c]) for c in COLUMNS) + " |" for r in data]
    md_path = workdir / "report.md"
    atomic.write_text(md_path, "\n".join(md) + "\n")
    style = ("body{font-family:sans-serif}table{border-collapse:collapse}td,th{border:1px solid #ccc;"
             "padding:4px 8px;font-size:13px}.failed{background:#fdd}.done{background:#dfd}"
             ".stale,.not-run{background:#ffd}")
    parts = ["<!DOCTYPE html><html><head><meta charset='utf-8'><title>gho2kvm report</title>",
             f"<style>{style}</style></head><body><h1>gho2kvm report</h1>",
             f"<p>{html.escape(str(cfg.path))}</p><table><tr>",
             "".join(f"<th>{html.escape(c)}</th>" for c in COLUMNS), "</tr>"]
    for r in data:
        cls = r["status"].replace(" ", "-")
        parts.append(f"<tr class='{cls}'>" + "".join(f"<td>{html.escape(str(r[c]))}</td>" for c in COLUMNS)
                     + "</tr>")
    parts.append("</table></body></html>")
    html_path = workdir / "report.html"
    atomic.write_text(html_path, "".join(parts) + "\n")
    return md_path, html_path
