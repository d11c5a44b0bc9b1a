"""``gho2kvm plan``: which steps would run for every image, and why. Touches nothing.

Reads the config, the receipts (small JSON files) and ``stat`` of inputs and outputs — never a disk
image's content, never libvirt — exactly what ``complete()`` reads, so the plan is what
``gho2kvm migrate`` will do (unless something changes in between).
"""

from __future__ import annotations

from pipeline.core import receipts
from pipeline.core.config import Config
from pipeline.tasks import chain

UP_TO_DATE = "up to date"
EARLIER = "an earlier step runs"


def plan_rows(cfg: Config, only: str | None = None) -> list[tuple[str, str, str]]:
    """(image id, step, reason) for every step; reason ``up to date`` when it would not run."""
    rows = []
    for img in cfg.images:
        if only and img.id != only:
            continue
        upstream_runs = False
        for t in chain(str(cfg.path.absolute()), img.id):
            receipt = t.receipt()
            try:
                own = t.own_stale_reason()
            except Exception as e:  # e.g. the disk ghost-convert will produce is unknown yet
                own = EARLIER if upstream_runs else f"cannot tell yet ({type(e).__name__}: {e})"
            if own is not None and own != EARLIER:
                err = receipts.read(t.error_path)
                if err is not None and (receipt is None or str(err.get("finished") or "")
                                        >= str(receipt.get("finished") or "")):
                    own += f"; last attempt failed: {err.get('error')}"
            if own is None and upstream_runs:
                own = EARLIER
            if own is not None:
                upstream_runs = True
            rows.append((img.id, t.step, own or UP_TO_DATE))
    return rows


def plan_notes(cfg: Config, only: str | None = None) -> list[str]:
    """``REFUSED: ...``/``warning: ...`` lines for images whose inspect facts exist: bus/NIC
    readiness and user ``.reg`` files naming a control set the guest does not boot from."""
    from pipeline.steps.registry_merge import plan_warnings

    notes: list[str] = []
    for img in cfg.images:
        if only and img.id != only:
            continue
        inspected = receipts.read(img.image_dir / "inspect.json")
        facts = (inspected or {}).get("result") or {}
        if not facts:
            continue
        try:
            refusals, warnings = plan_warnings(img, facts)
        except Exception as e:  # a .reg file changed into something malformed since the config check
            refusals, warnings = [f"image '{img.id}': {e}"], []
        notes += [f"REFUSED: {r}" for r in refusals] + [f"warning: {w}" for w in warnings]
    return notes


def plan_text(cfg: Config, only: str | None = None) -> str:
    rows = plan_rows(cfg, only)
    w0 = max([len(r[0]) for r in rows] + [5])
    w1 = max([len(r[1]) for r in rows] + [4])
    lines = [f"{'image'.ljust(w0)}  {'step'.ljust(w1)}  action"]
    for image_id, step, why in rows:
        action = "skip (up to date)" if why == UP_TO_DATE else f"RUN: {why}"
        lines.append(f"{image_id.ljust(w0)}  {step.ljust(w1)}  {action}")
    todo = sum(1 for r in rows if r[2] != UP_TO_DATE)
    images = len({r[0] for r in rows if r[2] != UP_TO_DATE})
    lines.append(f"{todo} step(s) to run in {images} image(s), {len(rows) - todo} up to date")
    lines += plan_notes(cfg, only)
    return "\n".join(lines)
