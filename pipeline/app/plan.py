"""``gho2kvm plan``: which steps would run for every image, and why. Touches nothing.

Reads the config, the receipts (small JSON files) and ``stat`` of inputs and outputs — never a disk
image's content, never libvirt — exactly what ``complete()`` reads, so the plan is what
``gho2kvm migrate`` will do (unless something changes in between).
"""

from __future__ import annotations

from pipeline.app.status import StepState, StepStatus, chain_status, image_chains
from pipeline.core.config import Config
from pipeline.tasks import Inspect

UP_TO_DATE = "up to date"
EARLIER = "an earlier step runs"


def plan_rows(cfg: Config, only: str | None = None) -> list[tuple[str, str, str]]:
    """(image id, step, reason) for every step; reason ``up to date`` when it would not run."""
    rows = []
    for img, steps in image_chains(cfg, only):
        for st in chain_status(steps):
            rows.append((img.id, st.step, reason(st)))
    return rows


def reason(st: StepStatus) -> str:
    """Why ``gho2kvm migrate`` would run the step: its own change (and a failed last attempt), or
    :data:`EARLIER`; :data:`UP_TO_DATE` when it would not run."""
    if st.state is StepState.DONE:
        return UP_TO_DATE
    if st.own is None or (st.own_unknown and not st.upstream_done):
        return EARLIER
    own = f"cannot tell yet ({st.own})" if st.own_unknown else st.own
    if st.error is not None:
        own += f"; last attempt failed: {st.error.get('error')}"
    return own


def plan_notes(cfg: Config, only: str | None = None) -> list[str]:
    """``REFUSED: ...``/``warning: ...`` lines for images whose inspect facts exist: bus/NIC
    readiness and user ``.reg`` files naming a control set the guest does not boot from."""
    from pipeline.steps.registry_merge import plan_edits, plan_warnings

    notes: list[str] = []
    for img in cfg.images:
        if only and img.id != only:
            continue
        facts = Inspect(config_path=str(cfg.path.absolute()), image_id=img.id).result()
        if facts is None:
            continue
        try:
            refusals, warnings = plan_warnings(img, facts)
        except Exception as e:  # a .reg file changed into something malformed since the config check
            refusals, warnings = [f"image '{img.id}': {e}"], []
        notes += [f"REFUSED: {r}" for r in refusals] + [f"warning: {w}" for w in warnings]
        if not refusals:
            try:
                notes += [f"registry: {line}" for line in plan_edits(img, facts)]
            except Exception as e:  # the same malformed file: already one line above
                notes.append(f"registry: image '{img.id}': edits cannot be counted: {e}")
        notes += [f"image '{img.id}': network: {i.describe()}" for i in facts.network if i.adapter]
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
    lines += vm_origin_lines(cfg, only)
    return "\n".join(lines)


def vm_origin_lines(cfg: Config, only: str | None = None) -> list[str]:
    """For each image from a VMware VM: where each setting came from (vmx / config / default)."""
    out: list[str] = []
    for img in cfg.images:
        if img.vm is None or (only and img.id != only):
            continue
        out.append(f"image {img.id}: from VMware VM {img.vm}")
        w = max(len(k) for k, _, _ in img.origins)
        for key, value, origin in img.origins:
            out.append(f"  {key.ljust(w)}  {value}  ({origin})")
    return out
