"""Run the pipeline with luigi and turn luigi's result into an exit code and a summary table."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import luigi

from pipeline import log, receipts
from pipeline.config import Config
from pipeline.tasks import MigrateAll, chain
from pipeline.tasks.base import ImageTask


@dataclass
class ImageStatus:
    image_id: str
    last_step: str  # last complete step ("-" when none)
    status: str  # done | failed | pending
    duration_s: float
    error: str


def run_log_path(cfg: Config) -> Path:
    ts = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    return cfg.images[0].workdir / "logs" / f"run-{ts}-{os.getpid()}.jsonl"


def migrate(cfg: Config, *, image: str | None = None, workers: int = 1, scheduler: str | None = None,
            scheduler_url: str | None = None) -> int:
    if image:
        cfg.image(image)  # unknown id → InputError before anything runs
    scheduler = scheduler or cfg.settings.scheduler
    kwargs: dict[str, Any] = {"workers": workers, "detailed_summary": True}
    if scheduler == "central":
        url = scheduler_url or cfg.settings.scheduler_url
        kwargs["scheduler_url"] = url
        kwargs["local_scheduler"] = False
    else:
        kwargs["local_scheduler"] = True
    log_file = run_log_path(cfg)
    log.configure(log_file=log_file)
    log.get().info("migration started", config=str(cfg.path), images=len(cfg.images), only=image,
                   workers=workers, scheduler=scheduler, log_file=str(log_file))
    task = MigrateAll(config_path=str(cfg.path.absolute()), only=image or "")
    result = luigi.build([task], **kwargs)
    statuses = summarize(cfg, image)
    print_summary(statuses)
    ok = result.status.name in ("SUCCESS", "SUCCESS_WITH_RETRY") and all(s.status == "done" for s in statuses)
    if result.status.name == "SCHEDULING_FAILED":
        print(f"scheduling failed (is luigid reachable at {kwargs.get('scheduler_url')}?)", file=sys.stderr)
    return 0 if ok else 1


def summarize(cfg: Config, only: str | None = None) -> list[ImageStatus]:
    out = []
    path = str(cfg.path.absolute())
    for img in cfg.images:
        if only and img.id != only:
            continue
        steps = chain(path, img.id)
        last, status, error, duration = "-", "pending", "", 0.0
        for t in steps:
            r = t.receipt()
            if _safe_stale(t) is None and r is not None:
                last = t.step
                duration += float(r.get("duration_s", 0))
                continue
            err = receipts.read(t.error_path)
            if err is not None and (r is None or err.get("finished", "") >= r.get("finished", "")):
                status, error = "failed", str(err.get("error", ""))
                duration += float(err.get("duration_s", 0))
            break
        else:
            status = "done"
        out.append(ImageStatus(img.id, last, status, round(duration, 1), error))
    return out


def _safe_stale(t: ImageTask) -> str | None:
    try:
        return t.stale_reason()
    except Exception as e:
        return f"{type(e).__name__}: {e}"


def print_summary(statuses: list[ImageStatus], file: Any = None) -> None:
    file = file or sys.stdout
    rows = [("image", "last step", "status", "seconds", "error")]
    rows += [(s.image_id, s.last_step, s.status, f"{s.duration_s:.1f}", s.error) for s in statuses]
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r[:4], widths, strict=True)) + "  " + r[4], file=file)
