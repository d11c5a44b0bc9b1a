"""``gho2kvm plan``: which steps would run for every image, and why. Reads receipts and stats only."""

from __future__ import annotations

from pipeline import receipts
from pipeline.config import Config
from pipeline.tasks import chain


def plan_rows(cfg: Config, only: str | None = None) -> list[tuple[str, str, str]]:
    """(image id, step, reason) for every step; reason ``up to date`` when it would not run."""
    rows = []
    for img in cfg.images:
        if only and img.id != only:
            continue
        upstream_runs = False
        for t in chain(str(cfg.path.absolute()), img.id):
            try:
                own = receipts.why_stale(t.receipt(), t.fingerprint())
            except Exception as e:  # e.g. upstream output unknown yet
                own = f"cannot tell yet ({type(e).__name__}: {e})"
            if own is None and upstream_runs:
                own = "an earlier step runs"
            if own is not None:
                upstream_runs = True
            rows.append((img.id, t.step, own or "up to date"))
    return rows


def plan_text(cfg: Config, only: str | None = None) -> str:
    rows = plan_rows(cfg, only)
    w0 = max([len(r[0]) for r in rows] + [5])
    w1 = max([len(r[1]) for r in rows] + [4])
    lines = [f"{'image'.ljust(w0)}  {'step'.ljust(w1)}  action"]
    for image_id, step, why in rows:
        action = "skip (up to date)" if why == "up to date" else f"RUN: {why}"
        lines.append(f"{image_id.ljust(w0)}  {step.ljust(w1)}  {action}")
    todo = sum(1 for r in rows if r[2] != "up to date")
    lines.append(f"{todo} step(s) to run, {len(rows) - todo} up to date")
    return "\n".join(lines)
