"""Receipts for a whole chain without running a step: each step's result is a plausible stand-in
and its fingerprint the one the task computes now, so every step reads as up to date."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from pipeline.core import receipts
from pipeline.core.receipts import Receipt
from pipeline.model.inspect import InspectFacts
from pipeline.model.results import ConvertResult, Defined, DomainXml, GhostConvertResult, MergeResult
from pipeline.tasks import chain
from pipeline.tasks.base import ImageTask

XP_FACTS = InspectFacts(os="windows", os_type="windows", product_name="Microsoft Windows XP", major_version=5,
                        minor_version=1, arch="i386", systemroot="/WINDOWS", root="/dev/sda1",
                        current_control_set="ControlSet001", virtual_size=1 << 26, actual_size=1 << 20,
                        drivers_present={"atapi.sys": True, "intelide.sys": True, "pciide.sys": True,
                                         "pciidex.sys": True})


def stand_in(task: ImageTask[Any], facts: InspectFacts) -> receipts.StepResult:
    img = task.image
    if task.step == "ghost-convert":
        return GhostConvertResult(disk=img.image_dir / "ghost.raw", disk_format="raw", backend="native")
    if task.step == "inspect":
        disk = task.step_input().disk
        return InspectFacts.from_dict({**facts.to_dict(), "source": str(disk), "image_id": img.id})
    if task.step == "registry-merge":
        return MergeResult(skipped=False, overlay=img.image_dir / "overlay.qcow2")
    if task.step == "convert":
        return ConvertResult(input=img.image_dir / "overlay.qcow2", input_format="qcow2",
                             output=img.final_disk, format=img.format, verified=img.verify)
    if task.step == "xml-render":
        return DomainXml(domain_xml=img.image_dir / "domain.xml", name=img.domain_name, uri=img.libvirt_uri,
                         disk_bus=img.disk_bus, nic_model=img.nic_model or "rtl8139", memory_mib=512)
    return Defined(action="created", name=img.domain_name, uuid="0", uri=img.libvirt_uri)


def write_chain(config: Path, image_id: str, *, facts: InspectFacts = XP_FACTS,
                until: str | None = None) -> list[ImageTask[Any]]:
    """Write a receipt for every step of ``image_id`` (up to and including ``until``), in order."""
    from pipeline.core import paths

    tasks = chain(str(config), image_id)
    for t in tasks:
        folder = t.image.image_dir  # as an earlier run made it: with gho2kvm's marker
        folder.mkdir(parents=True, exist_ok=True)
        if not paths.owns_folder(folder):
            (folder / paths.MARKER).write_text(f'{{"made_by": "{paths.MADE_BY}", "image_id": "{t.image.id}", '
                                               '"outputs": {}}')
        result = stand_in(t, facts)
        r = Receipt(step=t.step, image_id=image_id, run_id=receipts.new_run_id(), started="", finished="",
                    duration_s=0.0, fingerprint=t.fingerprint(), outputs={}, bytes_read=0, bytes_written=0,
                    result=result)
        if t.step == "inspect":  # what fingerprint_after adds once the facts are known
            r = replace(r, fingerprint=t.fingerprint_after(dict(r.fingerprint), receipts.Outcome(result)))
        receipts.write(t.receipt_path, r.to_dict())
        if t.step == until:
            break
    return tasks
