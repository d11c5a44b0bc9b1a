"""``gho2kvm report``: ``<workdir>/report.md`` and a self-contained ``report.html`` from receipts.

Per image: its status and the boot check's verdict (with its screenshot as an inline thumbnail in
the HTML), and per step the status (done / failed / stale / not run), start and end,
duration, bytes read and written, outputs, warnings and the error of a failed attempt. Reads
receipts and error records only (plus ``stat`` for staleness); the HTML has no external resources.
"""

from __future__ import annotations

import html
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pipeline.app.status import StepState, chain_status, image_chains
from pipeline.core import atomic, receipts
from pipeline.core.choices import Step
from pipeline.core.config import Config
from pipeline.tools import screen

COLUMNS = ("image", "step", "status", "started", "finished", "seconds", "bytes read", "bytes written",
           "outputs", "warnings / error")
IMAGE_COLUMNS = ("image", "status", "last step", "steps done", "seconds", "boot", "error")


def human_bytes(n: Any) -> str:
    if not isinstance(n, int | float) or isinstance(n, bool):
        return ""
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(size) < 1024 or unit == "TiB":
            return f"{int(size)} B" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return str(n)


def rows(cfg: Config) -> list[dict[str, Any]]:
    out = []
    for img, steps in image_chains(cfg):
        for st in chain_status(steps):
            r, err = st.receipt, st.error
            src = err or r or {}
            notes = [f"error: {err.get('error')}"] if err else []
            notes += [f"warning: {w}" for w in (r or {}).get("warnings", [])] if not err else []
            notes += guest_notes(st.step, (r or {}).get("result")) if not err else []
            if st.state is StepState.STALE and st.why:
                notes.append(f"stale: {st.why}")
            ok = r if r is not None and not err else {}
            out.append({
                "image": img.id, "step": st.step, "status": str(st.state),
                "started": src.get("started") or "", "finished": src.get("finished") or "",
                "seconds": src.get("duration_s", ""),
                "bytes read": human_bytes(ok.get("bytes_read")),
                "bytes written": human_bytes(ok.get("bytes_written")),
                "outputs": ", ".join(o["path"] for o in ok.get("outputs", {}).values()
                                     if isinstance(o, dict) and "path" in o),
                "warnings / error": "; ".join(notes),
                "_boot": (screen.recorded(r, receipts.read(st.task.error_path)) if st.step == Step.DEFINE
                          else None),
            })
    return out


def guest_notes(step: str, result: Any) -> list[str]:
    """The guest's old network (inspect) and each change made in the guest (registry-merge)."""
    if not isinstance(result, dict):
        return []
    if step == Step.INSPECT:
        from pipeline.guest.network import NetInterface

        return [f"network: {NetInterface.from_dict(i).describe()}" for i in result.get("network") or []
                if isinstance(i, dict) and i.get("adapter")]
    if step == Step.REGISTRY_MERGE:
        return [f"changed: {c.get('key')}{chr(92) + c['value'] if c.get('value') else ''}: {c.get('was')} → "
                f"{c.get('now')}" for c in result.get("guest_changes") or [] if isinstance(c, dict)]
    return []


def image_rows(step_rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    by_image: dict[str, list[dict[str, Any]]] = {}
    for r in step_rows:
        by_image.setdefault(r["image"], []).append(r)
    out = []
    for image, steps in by_image.items():
        done = [s for s in steps if s["status"] == "done"]
        failed = next((s for s in steps if s["status"] == "failed"), None)
        last = "-"
        for s in steps:
            if s["status"] != "done":
                break
            last = s["step"]
        if failed:  # the last step reached is the failed one, as in the summary
            last = failed["step"]
        status = "failed" if failed else "done" if len(done) == len(steps) else "not finished"
        seconds = sum(float(s["seconds"]) for s in steps if isinstance(s["seconds"], int | float))
        boot = next((s["_boot"] for s in steps if s.get("_boot")), None)
        out.append({"image": image, "status": status, "last step": last,
                    "steps done": f"{len(done)}/{len(steps)}", "seconds": round(seconds, 1),
                    "boot": screen.short(boot) + (f" after {boot['seconds_to_verdict']} s"
                                                  if boot and boot.get("seconds_to_verdict") is not None
                                                  else ""),
                    "_screenshot": (boot or {}).get("screenshot"),
                    "error": f"{failed['step']}: {failed['warnings / error'].removeprefix('error: ')}"
                    if failed else ""})
    return out


def _md_cell(v: Any) -> str:
    return str(v).replace("|", "\\|").replace("\n", " ")


def _md_table(columns: tuple[str, ...], data: list[dict[str, Any]]) -> list[str]:
    return (["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
            + ["| " + " | ".join(_md_cell(r[c]) for c in columns) + " |" for r in data])


def _html_cell(r: dict[str, Any], c: str) -> str:
    cell = html.escape(str(r[c]))
    if c == "boot":  # the boot check's last screenshot as an inline thumbnail
        uri = screen.thumbnail_data_uri(r.get("_screenshot"))
        if uri:
            cell += f"<br><img class='shot' alt='screenshot' src='{uri}'>"
    return f"<td>{cell}</td>"


def _html_table(columns: tuple[str, ...], data: list[dict[str, Any]]) -> str:
    parts = ["<table><tr>", "".join(f"<th>{html.escape(c)}</th>" for c in columns), "</tr>"]
    for r in data:
        cls = str(r["status"]).replace(" ", "-")
        parts.append(f"<tr class='{cls}'>" + "".join(_html_cell(r, c) for c in columns) + "</tr>")
    parts.append("</table>")
    return "".join(parts)


def write_report(cfg: Config) -> tuple[Path, Path]:
    data = rows(cfg)
    images = image_rows(data)
    workdir = cfg.images[0].workdir
    generated = datetime.now(UTC).isoformat(timespec="seconds")
    counts = {s: sum(1 for i in images if i["status"] == s) for s in ("done", "failed", "not finished")}
    totals = ", ".join(f"{n} {s}" for s, n in counts.items())
    md = [f"# gho2kvm report — {cfg.path}", "", f"Generated {generated}; {len(images)} image(s): {totals}.",
          "", "## Images", "", *_md_table(IMAGE_COLUMNS, images), "", "## Steps", "",
          *_md_table(COLUMNS, data)]
    md_path = workdir / "report.md"
    atomic.write_text(md_path, "\n".join(md) + "\n")
    style = ("body{font-family:sans-serif;margin:1.5em}table{border-collapse:collapse;margin-bottom:1.5em}"
             "td,th{border:1px solid #ccc;padding:4px 8px;font-size:13px;vertical-align:top}"
             "th{background:#eee}.failed{background:#fdd}.done{background:#dfd}"
             ".stale,.not-run,.not-finished{background:#ffd}img.shot{margin-top:4px;border:1px solid #999}")
    page = ("<!DOCTYPE html><html><head><meta charset='utf-8'><title>gho2kvm report</title>"
            f"<style>{style}</style></head><body><h1>gho2kvm report</h1>"
            f"<p>{html.escape(str(cfg.path))}<br>Generated {html.escape(generated)}; {len(images)} image(s): "
            f"{html.escape(totals)}.</p><h2>Images</h2>{_html_table(IMAGE_COLUMNS, images)}"
            f"<h2>Steps</h2>{_html_table(COLUMNS, data)}</body></html>")
    html_path = workdir / "report.html"
    atomic.write_text(html_path, page + "\n")
    return md_path, html_path
