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
                "_bytes": (ok.get("bytes_read") or 0, ok.get("bytes_written") or 0),
                "_boot": (screen.recorded(r, receipts.read(st.task.error_path)) if st.step == Step.DEFINE
                          else None),
            })
    return out


def guest_notes(step: str, result: Any) -> list[str]:
    """The guest's old network (inspect) and each change made in the guest (registry-merge)."""
    if not isinstance(result, dict):
        return []
    if step == Step.INSPECT:
        from pipeline.model.guest import NetInterface

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
    return f"<td>{html.escape(str(r[c]))}</td>"


def _html_table(columns: tuple[str, ...], data: list[dict[str, Any]], cls: str = "") -> str:
    parts = [f"<table class='{cls}'><tr>" if cls else "<table><tr>",
             "".join(f"<th>{html.escape(c)}</th>" for c in columns), "</tr>"]
    for r in data:
        status = str(r.get("status", "")).replace(" ", "-")
        parts.append(f"<tr class='{status}'>" + "".join(_html_cell(r, c) for c in columns) + "</tr>")
    parts.append("</table>")
    return "".join(parts)


# -- timeline and totals ------------------------------------------------------------------------
def _when(value: Any) -> datetime | None:
    try:
        t = datetime.fromisoformat(str(value))
    except ValueError:
        return None
    return t if t.tzinfo else t.replace(tzinfo=UTC)


def _bar(r: dict[str, Any]) -> tuple[datetime, float] | None:
    """(start, seconds) of a step row that ran (done, failed or stale), else None."""
    start, end = _when(r["started"]), _when(r["finished"])
    if start is None:
        return None
    secs = r["seconds"] if isinstance(r["seconds"], int | float) else None
    if secs is None and end is not None:
        secs = (end - start).total_seconds()
    return (start, max(0.0, float(secs or 0.0)))


def window(step_rows: list[dict[str, Any]]) -> tuple[datetime, datetime] | None:
    """From the first step's start to the last step's end (None when nothing ran)."""
    bars = [b for r in step_rows if (b := _bar(r))]
    if not bars:
        return None
    t0 = min(b[0] for b in bars)
    t1 = max(b[0].timestamp() + b[1] for b in bars)
    return t0, datetime.fromtimestamp(max(t1, t0.timestamp()), UTC)


STATUS_COLOURS = {"done": "#3a9d3a", "failed": "#d03030", "stale": "#d6a400", "not run": "#aaaaaa"}
LABEL_W, PLOT_W, ROW_H = 170, 760, 22


def timeline_svg(step_rows: list[dict[str, Any]], image_ids: list[str]) -> str:
    """One row per image, one bar per step that ran, at its start and as long as it took, coloured by
    status; hover text names image, step, status and seconds. Self-contained SVG."""
    win = window(step_rows)
    height = ROW_H * len(image_ids) + 30
    out = [f"<svg class='timeline' width='{LABEL_W + PLOT_W + 40}' "
           f"height='{height}' role='img' aria-label='timeline: one row per image, one bar per step'>"]
    t0 = win[0].timestamp() if win else 0.0
    span = max((win[1].timestamp() - t0) if win else 0.0, 1e-6)
    for k in range(5):  # time axis
        x = LABEL_W + PLOT_W * k / 4
        label = datetime.fromtimestamp(t0 + span * k / 4, UTC).strftime("%H:%M:%S") if win else ""
        out.append(f"<line x1='{x:.1f}' y1='0' x2='{x:.1f}' y2='{height - 18}' stroke='#ddd'/>"
                   f"<text x='{x:.1f}' y='{height - 4}' font-size='11' text-anchor='middle'>{label}</text>")
    by_image: dict[str, list[dict[str, Any]]] = {i: [] for i in image_ids}
    for r in step_rows:
        by_image.setdefault(r["image"], []).append(r)
    for row_no, image in enumerate(image_ids):
        y = row_no * ROW_H
        out.append(f"<g class='tl-row' data-image='{html.escape(image, quote=True)}'>"
                   f"<text x='4' y='{y + 15}' font-size='12'>{html.escape(image[:24])}</text>")
        for r in by_image[image]:
            bar = _bar(r)
            if bar is None:
                continue
            x = LABEL_W + PLOT_W * (bar[0].timestamp() - t0) / span
            w = max(2.0, PLOT_W * bar[1] / span)
            colour = STATUS_COLOURS.get(r["status"], "#888")
            tip = f"{image} {r['step']}: {r['status']}, {bar[1]:.1f} s"
            out.append(f"<rect class='bar {html.escape(r['status'].replace(' ', '-'))}' "
                       f"data-step='{html.escape(r['step'])}' x='{x:.1f}' y='{y + 3}' width='{w:.1f}' "
                       f"height='{ROW_H - 6}' fill='{colour}' stroke='#fff'><title>{html.escape(tip)}"
                       "</title></rect>")
        out.append("</g>")
    out.append("</svg>")
    return "".join(out)


def totals(step_rows: list[dict[str, Any]], images: list[dict[str, Any]]) -> dict[str, Any]:
    """Images per hour over the run's window, bytes read and written, time per step."""
    win = window(step_rows)
    wall = (win[1] - win[0]).total_seconds() if win else 0.0
    done = sum(1 for i in images if i["status"] == "done")
    per_step: dict[str, list[float]] = {}
    for r in step_rows:
        if r["status"] != "not run" and isinstance(r["seconds"], int | float):
            per_step.setdefault(r["step"], []).append(float(r["seconds"]))
    busy = sum(sum(v) for v in per_step.values()) or 1.0
    return {
        "images": len(images), "done": done, "wall_s": round(wall, 1),
        "images_per_hour": round(done * 3600 / wall, 1) if wall > 0 else None,
        "bytes_read": sum(r["_bytes"][0] for r in step_rows),
        "bytes_written": sum(r["_bytes"][1] for r in step_rows),
        "steps": [{"step": k, "runs": len(v), "seconds": round(sum(v), 1), "mean": round(sum(v) / len(v), 1),
                   "share": f"{100 * sum(v) / busy:.0f} %"} for k, v in per_step.items()],
    }


TOTAL_STEP_COLUMNS = ("step", "runs", "seconds", "mean", "share")


def _totals_line(t: dict[str, Any]) -> str:
    rate = f"{t['images_per_hour']} images/hour" if t["images_per_hour"] is not None else "no image done"
    return (f"{t['done']} of {t['images']} image(s) done in {t['wall_s']} s ({rate}); "
            f"read {human_bytes(t['bytes_read']) or '0 B'}, wrote {human_bytes(t['bytes_written']) or '0 B'}")


def screenshot_grid(images: list[dict[str, Any]]) -> str:
    """The boot checks' screenshots, one small figure per image that has one."""
    figs = []
    for i in images:
        uri = screen.thumbnail_data_uri(i.get("_screenshot"))
        if uri:
            figs.append(f"<figure data-image='{html.escape(i['image'], quote=True)}'>"
                        f"<img class='shot' alt='screenshot' src='{uri}'>"
                        f"<figcaption>{html.escape(i['image'])}: {html.escape(i['boot'])}</figcaption>"
                        "</figure>")
    return f"<div class='shots'>{''.join(figs)}</div>" if figs else "<p>No boot check screenshots.</p>"


STYLE = ("body{font-family:sans-serif;margin:1.5em}table{border-collapse:collapse;margin-bottom:1.5em}"
         "td,th{border:1px solid #ccc;padding:4px 8px;font-size:13px;vertical-align:top}"
         "th{background:#eee}.failed{background:#fdd}.done{background:#dfd}"
         ".stale,.not-run,.not-finished{background:#ffd}table.plain tr{background:none}"
         ".shots{display:grid;grid-template-columns:repeat(auto-fill,minmax(250px,1fr));gap:10px}"
         "figure{margin:0;border:1px solid #ccc;padding:4px;font-size:12px}img.shot{max-width:100%}"
         ".legend span{display:inline-block;padding:1px 6px;margin-right:6px;color:#fff;font-size:12px}")


def write_report(cfg: Config) -> tuple[Path, Path]:
    data = rows(cfg)
    images = image_rows(data)
    workdir = cfg.images[0].workdir
    generated = datetime.now(UTC).isoformat(timespec="seconds")
    counts = {s: sum(1 for i in images if i["status"] == s) for s in ("done", "failed", "not finished")}
    status_line = ", ".join(f"{n} {s}" for s, n in counts.items())
    t = totals(data, images)
    md = [f"# gho2kvm report — {cfg.path}", "",
          f"Generated {generated}; {len(images)} image(s): {status_line}.",
          "", f"Totals: {_totals_line(t)}.", "", "## Images", "", *_md_table(IMAGE_COLUMNS, images), "",
          "## Time per step", "", *_md_table(TOTAL_STEP_COLUMNS, t["steps"]), "", "## Steps", "",
          *_md_table(COLUMNS, data)]
    md_path = workdir / "report.md"
    atomic.write_text(md_path, "\n".join(md) + "\n")
    legend = "".join(f"<span style='background:{c}'>{html.escape(s)}</span>"
                     for s, c in STATUS_COLOURS.items())
    # the page is a list of sections: (title, HTML); add one to add to the report
    sections = [
        ("Totals", f"<p class='totals'>{html.escape(_totals_line(t))}</p>"
                   + _html_table(TOTAL_STEP_COLUMNS, t["steps"], "plain")),
        ("Timeline", f"<p class='legend'>{legend}</p>{timeline_svg(data, [i['image'] for i in images])}"),
        ("Images", _html_table(IMAGE_COLUMNS, images)),
        ("Boot screenshots", screenshot_grid(images)),
        ("Steps", _html_table(COLUMNS, data)),
    ]
    body = "".join(f"<h2>{html.escape(title)}</h2>{content}" for title, content in sections)
    page = ("<!DOCTYPE html><html><head><meta charset='utf-8'><title>gho2kvm report</title>"
            f"<style>{STYLE}</style></head><body><h1>gho2kvm report</h1>"
            f"<p>{html.escape(str(cfg.path))}<br>Generated {html.escape(generated)}; {len(images)} image(s): "
            f"{html.escape(status_line)}.</p>{body}</body></html>")
    html_path = workdir / "report.html"
    atomic.write_text(html_path, page + "\n")
    return md_path, html_path
