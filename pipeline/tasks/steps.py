"""The six steps of one image and the wrappers over images.

[ghost-convert] → inspect → registry-merge → convert → xml-render → define
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import luigi

from pipeline.core import log, receipts
from pipeline.core.config import BUILTIN_REGISTRY
from pipeline.core.errors import InputError, TransientError
from pipeline.registry import builtin
from pipeline.tasks.base import ImageTask, get_config


class GhostConvert(ImageTask):
    """``.gho`` → ``ghost.vmdk`` (Ghost's own executable) or ``ghost.raw`` (native reader; convert may
    adopt it as the final disk, see :mod:`pipeline.steps.adopt` for when this step is then complete)."""

    step = "ghost-convert"
    resources = {"disk_io": 1}

    def fingerprint(self) -> dict[str, Any]:
        from pipeline.gho.spans import find_spans

        fp = super().fingerprint()
        img = self.image
        fp["source"] = receipts.file_stamp(img.source)
        fp["spans"] = [receipts.file_stamp(p) for p in find_spans(img.source)]
        g = img.ghost
        fp["ghost"] = {"backend": g.backend, "command": list(g.command), "vmdk_type": g.vmdk_type,
                       "vmdk_size_mb": g.vmdk_size_mb, "vmdk_split_mb": g.vmdk_split_mb,
                       "adapter": g.adapter, "password_env": g.password_env, "path_style": g.path_style}
        return fp

    def own_stale_reason(self) -> str | None:
        # ghost.raw may have become the final disk (pipeline.steps.adopt: the rule)
        from pipeline.steps import adopt

        def downstream() -> list[tuple[str, dict[str, Any] | None, dict[str, Any]]]:
            merge = RegistryMerge(config_path=self.config_path, image_id=self.image_id)
            tasks: list[ImageTask] = [merge.upstream(), merge, Convert(config_path=self.config_path,
                                                                       image_id=self.image_id)]
            return [(t.step, t.receipt(), t.fingerprint()) for t in tasks]

        return adopt.ghost_stale_reason(self.receipt(), self.fingerprint(), downstream)

    def execute(self) -> dict[str, Any]:
        img = self.image
        g = img.ghost
        src_size = img.source.stat().st_size
        if g.backend == "exe":
            from pipeline.tools import ghost_exe

            self.progress(0, "running Ghost")
            res = ghost_exe.convert(g, img.source, img.image_dir, image_id=img.id,
                                    progress=lambda p: self.progress(p))
            result: dict[str, Any] = res.to_dict()
            disk = img.image_dir / "ghost.vmdk"
            outputs = {Path(o["path"]).name: o["path"] for o in result.get("outputs", [])}
            result.update({"disk": str(disk), "disk_format": "vmdk"})
            return {"result": result, "outputs": outputs, "bytes_read": src_size}
        from pipeline.gho import extract

        password = g.password(img.id, self.step)
        disk = img.image_dir / "ghost.raw"

        def on_progress(done: int, total: int) -> None:
            if total:
                self.progress(100.0 * done / total)

        # strict: an advisory mismatch (checksum, catalogue, header copy) stops the migration here
        native = extract(img.source, disk, password=password, progress=on_progress, strict=True)
        result = native.to_dict()
        result.update({"backend": "native", "disk": str(disk), "disk_format": "raw"})
        return {"result": result, "outputs": {"disk": str(disk)}, "bytes_read": src_size}


class Inspect(ImageTask):
    """Disk facts, safety checks and guest facts → ``inspect.json``."""

    step = "inspect"
    resources = {"appliance": 1}

    def upstream(self) -> ImageTask | None:
        if self.image.source.suffix.lower() == ".gho":
            return GhostConvert(config_path=self.config_path, image_id=self.image_id)
        return None

    def disk(self) -> tuple[Path, str | None]:
        """The disk this image's steps read: the source, or ghost-convert's output."""
        up = self.upstream()
        if up is None:
            return self.image.source, None
        r = up.receipt() or {}
        res = r.get("result", {})
        if "disk" not in res:
            raise InputError("ghost-convert has not produced a disk yet", image_id=self.image.id,
                             step=self.step)
        return Path(res["disk"]), res.get("disk_format")

    def fingerprint(self) -> dict[str, Any]:
        from pipeline.steps import adopt

        fp = super().fingerprint()
        disk, _ = self.disk()
        fp["disk"] = adopt.disk_stamp(disk, up.receipt() if (up := self.upstream()) else None)
        fp["extents"] = _extent_stamps((self.receipt() or {}).get("result", {}), disk)
        return fp

    def fingerprint_after(self, fingerprint: dict[str, Any], out: dict[str, Any]) -> dict[str, Any]:
        # a VMDK's extent files are inputs too, known only once inspected: the receipt covers them
        disk, _ = self.disk()
        return {**fingerprint, "extents": _extent_stamps(out.get("result", {}), disk)}

    def execute(self) -> dict[str, Any]:
        from pipeline.steps.inspect import inspect

        disk, fmt = self.disk()
        self.progress(5, "inspecting (one appliance launch)")
        facts = inspect(disk, self.image.id, force_tcg=self.force_tcg, fmt=fmt)
        return {"result": facts, "outputs": {}}


def _extent_stamps(facts: dict[str, Any], disk: Path) -> list[dict[str, Any]]:
    return [receipts.file_stamp(e["path"]) for e in facts.get("extents", []) or []
            if isinstance(e, dict) and e.get("path") and e.get("path") != str(disk)]


class RegistryMerge(ImageTask):
    """MergeIDE + user ``.reg`` files into ``overlay.qcow2`` (the source is never written)."""

    step = "registry-merge"
    resources = {"appliance": 1}

    def upstream(self) -> Inspect:
        return Inspect(config_path=self.config_path, image_id=self.image_id)

    def fingerprint(self) -> dict[str, Any]:
        fp = super().fingerprint()
        img = self.image
        fp["registry"] = [
            {"builtin": r, "data": builtin.data_hash()} if r in BUILTIN_REGISTRY
            else receipts.content_hash(r)
            for r in img.registry
        ]
        fp["registry_remap_controlset"] = img.registry_remap_controlset
        if img.virtio is not None:
            fp["virtio"] = receipts.file_stamp(img.virtio.drivers)
        return fp

    def execute(self) -> dict[str, Any]:
        from pipeline.steps.registry_merge import registry_merge

        up = self.upstream()
        facts = self.upstream_receipt().get("result", {})
        disk, fmt = up.disk()
        result = registry_merge(self.image, facts, disk, fmt or facts.get("format", "raw"),
                                force_tcg=self.force_tcg, progress=lambda m: self.progress(None, m))
        outputs = {"overlay": result["overlay"]} if result.get("overlay") else {}
        return {"result": result, "outputs": outputs}


class Convert(ImageTask):
    """Overlay (or source) → ``<output_dir>/<id>.<format>`` in one verified pass."""

    step = "convert"
    resources = {"disk_io": 1}

    def upstream(self) -> RegistryMerge:
        return RegistryMerge(config_path=self.config_path, image_id=self.image_id)

    def fingerprint(self) -> dict[str, Any]:
        fp = super().fingerprint()
        img = self.image
        fp.update({"format": img.format, "verify": img.verify, "final_disk": str(img.final_disk)})
        return fp

    def execute(self) -> dict[str, Any]:
        from pipeline.steps.convert import convert_disk

        merge = self.upstream_receipt().get("result", {})
        inspect_task = self.upstream().upstream()
        facts = inspect_task.receipt() or {}
        if merge.get("overlay"):
            src, fmt = Path(merge["overlay"]), "qcow2"
        else:
            disk, dfmt = inspect_task.disk()
            src, fmt = disk, dfmt or facts.get("result", {}).get("format", "raw")
        read = facts.get("result", {}).get("actual_size") or 0
        ghost = inspect_task.upstream()
        if ghost is not None and (adopted := self._adopt(ghost.receipt(), merge)) is not None:
            return adopted
        result = convert_disk(self.image, src, fmt,
                              progress=lambda p: self.progress(p, f"converting {p:.0f}%"))
        return {"result": result, "outputs": {"disk": result["output"]}, "bytes_read": read}

    def _adopt(self, ghost_receipt: dict[str, Any] | None, merge: dict[str, Any]) -> dict[str, Any] | None:
        """ghost-convert's raw disk + the overlay committed into it as the final disk (written once),
        or None when it cannot be adopted (pipeline.steps.adopt)."""
        from pipeline.steps import adopt
        from pipeline.tasks.base import _inject_failure

        why = adopt.why_not(self.image, ghost_receipt)
        if why is not None or ghost_receipt is None:
            log.get().info("convert copies the disk", reason=why)
            return None
        overlay = Path(merge["overlay"]) if merge.get("overlay") else None
        result = adopt.adopt_disk(self.image, ghost_receipt, overlay,
                                  progress=lambda p: self.progress(p, f"committing {p:.0f}%"),
                                  committed=lambda: _inject_failure("convert-commit", "inside"))
        moved = result["adopted"]["overlay_allocated"]
        return {"result": result, "outputs": {"disk": result["output"]}, "bytes_read": moved,
                "bytes_written": moved}


DOMAIN_FIELDS = ("memory_mib", "vcpus", "disk_bus", "nic_model", "network", "name", "title", "description",
                 "uuid", "mac", "libvirt_uri", "format", "disk_cache", "disk_io", "cdrom", "virtio")


class XmlRender(ImageTask):
    """Facts + config + host capabilities → ``domain.xml`` (validated model, fixed element order)."""

    step = "xml-render"

    def upstream(self) -> Convert:
        return Convert(config_path=self.config_path, image_id=self.image_id)

    def fingerprint(self) -> dict[str, Any]:
        fp = super().fingerprint()
        img = self.image
        fp["domain"] = {f: _plain(getattr(img, f)) for f in DOMAIN_FIELDS}
        fp["force_tcg"] = self.force_tcg
        return fp

    def execute(self) -> dict[str, Any]:
        from pipeline.core import atomic
        from pipeline.domain.facts import DomainSpec, build_domain
        from pipeline.domain.render import render
        from pipeline.guest import windows as guest
        from pipeline.steps.registry_merge import readiness
        from pipeline.tools import virt

        img = self.image
        merge_task = self.upstream().upstream()
        facts = (merge_task.upstream().receipt() or {}).get("result", {})
        merged = (merge_task.receipt() or {}).get("result", {})
        installed = list((merged.get("virtio") or {}).get("installed") or {})
        ready = readiness(img, facts, installed=installed)
        ready.raise_refusals(img.id, self.step)
        host = virt.host_caps_for_uri(img.libvirt_uri, prefer_kvm=not self.force_tcg, image_id=img.id)
        spec = DomainSpec(
            name=img.domain_name, image_id=img.id, disk_path=str(img.final_disk.absolute()),
            title=img.title, description=img.description, uuid=img.uuid, mac=img.mac,
            memory_mib=img.memory_mib or guest.default_memory_mib(facts), vcpus=img.vcpus,
            disk_format=img.format, disk_bus=ready.disk_bus, nic_model=ready.nic_model, network=img.network,
            disk_cache=img.disk_cache, disk_io=img.disk_io,
            cdrom=None if img.cdrom is False else "" if img.cdrom is True else str(img.cdrom),
            os_major=facts.get("major_version") if facts.get("os") == "windows" else None,
            os_minor=facts.get("minor_version") if facts.get("os") == "windows" else None,
            arch={"i386": "i686", "x86_64": "x86_64"}.get(facts.get("arch", ""), "x86_64"),
            firmware=facts.get("firmware", "bios"),
        )
        xml = render(build_domain(spec, host))
        path = img.image_dir / "domain.xml"
        atomic.write_text(path, xml)
        for w in ready.warnings:
            log.get().warning("guest readiness", detail=w)
        return {"result": {"domain_xml": str(path), "name": spec.name, "uri": img.libvirt_uri,
                           "disk_bus": spec.disk_bus, "nic_model": spec.nic_model,
                           "memory_mib": spec.memory_mib,
                           "warnings": list(ready.warnings)},
                "outputs": {"domain_xml": str(path)}}


def _plain(value: Any) -> Any:
    """Config values as JSON for fingerprints (paths as strings, the virtio section as its path)."""
    if isinstance(value, Path):
        return str(value)
    drivers = getattr(value, "drivers", None)
    return str(drivers) if drivers is not None else value


class Define(ImageTask):
    """``domain.xml`` → libvirt domain (idempotent), optional boot check."""

    step = "define"
    attempts = 3
    retry_delay_s = 5.0

    def upstream(self) -> XmlRender:
        return XmlRender(config_path=self.config_path, image_id=self.image_id)

    def fingerprint(self) -> dict[str, Any]:
        fp = super().fingerprint()
        img = self.image
        fp.update({"libvirt_uri": img.libvirt_uri, "autostart": img.autostart,
                   "boot_check": img.boot_check.to_dict(), "start": img.start})
        return fp

    def execute(self) -> dict[str, Any]:
        from pipeline.tools import virt

        img = self.image
        xml = (img.image_dir / "domain.xml").read_text(encoding="utf-8")
        with virt.hold(img.libvirt_uri, image_id=img.id):
            for attempt in range(1, self.attempts + 1):
                try:
                    res = virt.define(img.libvirt_uri, xml, autostart=img.autostart, image_id=img.id)
                    break
                except TransientError:
                    if attempt == self.attempts:
                        raise
                    time.sleep(self.retry_delay_s * attempt)
            result: dict[str, Any] = res.to_dict()
            outputs: dict[str, str] = {}
            if img.boot_check:
                shot = img.image_dir / "boot.png"
                result["boot_check"] = virt.boot_check(
                    img.libvirt_uri, img.domain_name, img.boot_check.seconds, shot, keep_running=img.start,
                    expect=img.boot_check.expect, image_id=img.id)
                if shot.exists():
                    outputs["screenshot"] = str(shot)
            elif img.start:
                result["started"] = virt.start_domain(img.libvirt_uri, img.domain_name, image_id=img.id)
        return {"result": result, "outputs": outputs}


def chain(config_path: str, image_id: str) -> list[ImageTask]:
    """The steps of one image in order (ghost-convert only for ``.gho`` sources)."""
    last: ImageTask | None = Define(config_path=config_path, image_id=image_id)
    steps: list[ImageTask] = []
    while last is not None:
        steps.append(last)
        last = last.upstream()
    return list(reversed(steps))


class MigrateImage(luigi.WrapperTask):
    config_path = luigi.Parameter(description="path of the YAML config")
    image_id = luigi.Parameter(description="id of the image in the config")

    def requires(self) -> Define:
        return Define(config_path=self.config_path, image_id=self.image_id)


class MigrateAll(luigi.WrapperTask):
    """Every image of a config (or one, with ``only``)."""

    config_path = luigi.Parameter(description="path of the YAML config")
    only = luigi.Parameter(default="", description="one image id; empty = all images")

    def requires(self) -> list[MigrateImage]:
        try:
            cfg = get_config(str(self.config_path))
        except Exception:
            return []
        ids = [i.id for i in cfg.images if not self.only or i.id == self.only]
        return [MigrateImage(config_path=self.config_path, image_id=i) for i in ids]

