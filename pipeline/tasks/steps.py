"""The six steps of one image and the wrappers over images.

[ghost-convert] → inspect → registry-merge → convert → xml-render → define

Each task builds its step's input dataclass from the config and the typed results of the steps
before it, calls the step function (``pipeline.steps.<step>``) and returns an
:class:`~pipeline.core.receipts.Outcome`; the base stores the receipt.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import luigi

from pipeline.core import log
from pipeline.core.choices import Step
from pipeline.core.receipts import Outcome
from pipeline.model.inspect import InspectFacts
from pipeline.model.results import ConvertResult, Defined, DomainXml, GhostConvertResult, MergeResult
from pipeline.steps.convert import ConvertInput, convert_disk
from pipeline.steps.define import DefineInput, define_domain
from pipeline.steps.ghost_convert import GhostInput, ghost_convert
from pipeline.steps.inspect import InspectInput, inspect_image
from pipeline.steps.registry_merge import MergeInput, registry_merge
from pipeline.steps.xml_render import DomainConfig, RenderInput, render_domain
from pipeline.tasks.base import ImageTask, get_config, hooks


class GhostConvert(ImageTask[GhostConvertResult]):
    """``.gho`` → ``ghost.vmdk`` (Ghost's own executable; for a raw final disk a flat one, whose
    extent convert may adopt) or ``ghost.raw``/``ghost.qcow2`` (native reader, in the final disk's
    format; convert may adopt it as the final disk, see :mod:`pipeline.steps.adopt` for when this step
    is then complete)."""

    step = Step.GHOST_CONVERT
    result_type = GhostConvertResult
    resources = {"disk_io": 1}

    def step_input(self) -> GhostInput:
        from pipeline.gho.spans import find_spans

        img = self.image
        # the native reader writes the final disk's format (convert adopts it); Ghost writes a VMDK,
        # of the type vmdk_type: auto resolves to for that format (a flat one convert adopts for raw)
        exe = img.ghost.backend == "exe"
        fmt = "vmdk" if exe else str(img.format)
        ghost = img.ghost.for_format(img.format) if exe else img.ghost
        return GhostInput(image_id=img.id, source=img.source, image_dir=img.image_dir,
                          spans=tuple(find_spans(img.source)), ghost=ghost, disk_format=fmt)

    def own_stale_reason(self) -> str | None:
        # its disk (ghost.<format>, or Ghost's one flat extent) may have become the final disk
        # (pipeline.steps.adopt: the rule)
        from pipeline.steps import adopt

        def downstream() -> list[tuple[str, dict[str, Any] | None, dict[str, Any]]]:
            merge = RegistryMerge(config_path=self.config_path, image_id=self.image_id)
            tasks: list[ImageTask[Any]] = [merge.upstream(), merge, Convert(config_path=self.config_path,
                                                                            image_id=self.image_id)]
            return [(t.step, t.receipt(), t.fingerprint()) for t in tasks]

        return adopt.ghost_stale_reason(self.receipt(), self.fingerprint(), downstream)

    def execute(self) -> Outcome[GhostConvertResult]:
        inp = self.step_input()
        if inp.ghost.backend == "exe":
            self.progress(0, "running Ghost")
        res = ghost_convert(inp, progress=lambda p: self.progress(p))
        # the whole image is read: the first file and every .GHS span
        read = sum(p.stat().st_size for p in (inp.source, *inp.spans))
        return Outcome(res, outputs=res.outputs, bytes_read=read)


class Inspect(ImageTask[InspectFacts]):
    """Disk facts, safety checks and guest facts → ``inspect.json``."""

    step = Step.INSPECT
    result_type = InspectFacts
    resources = {"appliance": 1}

    def upstream(self) -> ImageTask[Any] | None:
        if self.image.source.suffix.lower() == ".gho":
            return GhostConvert(config_path=self.config_path, image_id=self.image_id)
        return None

    def step_input(self) -> InspectInput:
        """The disk this image's steps read: the source, or ghost-convert's output."""
        img = self.image
        if self.upstream() is None:
            return InspectInput(disk=img.source, image_id=img.id, force_tcg=self.force_tcg,
                                image_dir=img.image_dir, expect_os=img.expect_os)
        made = self.upstream_result(GhostConvert)
        return InspectInput(disk=made.disk, image_id=img.id, fmt=made.disk_format, force_tcg=self.force_tcg,
                            image_dir=img.image_dir, expect_os=img.expect_os)

    def fingerprint(self) -> dict[str, Any]:
        from pipeline.steps import adopt

        # a VMDK's extent files are inputs too, known from the last inspection
        fp = super().fingerprint()
        disk = self.step_input().disk
        # ghost-convert's disk (or Ghost's flat extent) by its receipt's stamp: unchanged when convert
        # adopts it (steps/adopt.py)
        ghost = up.receipt() if (up := self.upstream()) else None
        fp["disk"] = adopt.disk_stamp(disk, ghost)
        fp["extents"] = _extent_stamps(self.result(), disk, ghost)
        return fp

    def fingerprint_after(self, fingerprint: dict[str, Any], out: Outcome[InspectFacts]) -> dict[str, Any]:
        # ... and once inspected: the receipt covers them
        ghost = up.receipt() if (up := self.upstream()) else None
        return {**fingerprint, "extents": _extent_stamps(out.result, self.step_input().disk, ghost)}

    def execute(self) -> Outcome[InspectFacts]:
        inp = self.step_input()
        self.progress(5, "inspecting (one appliance launch)")
        return Outcome(inspect_image(inp))


def _extent_stamps(facts: InspectFacts | None, disk: Path,
                   ghost_receipt: dict[str, Any] | None) -> list[dict[str, Any]]:
    from pipeline.steps import adopt

    return [adopt.disk_stamp(Path(e.path), ghost_receipt) for e in (facts.extents if facts else ())
            if e.path and e.path != str(disk)]


class RegistryMerge(ImageTask[MergeResult]):
    """MergeIDE + user ``.reg`` files into ``overlay.qcow2`` (the source is never written)."""

    step = Step.REGISTRY_MERGE
    result_type = MergeResult
    resources = {"appliance": 1}

    def upstream(self) -> Inspect:
        return Inspect(config_path=self.config_path, image_id=self.image_id)

    def step_input(self) -> MergeInput:
        facts = self.upstream_result(Inspect)
        return MergeInput.from_config(self.image, facts, Path(facts.source), facts.format,
                                      force_tcg=self.force_tcg)

    def execute(self) -> Outcome[MergeResult]:
        res = registry_merge(self.step_input(), progress=lambda m: self.progress(None, m))
        return Outcome(res, outputs={"overlay": res.overlay} if res.overlay else {})


class Convert(ImageTask[ConvertResult]):
    """Overlay (or source) → ``<output_dir>/<id>.<format>`` in one verified pass."""

    step = Step.CONVERT
    result_type = ConvertResult
    resources = {"disk_io": 1}

    def upstream(self) -> RegistryMerge:
        return RegistryMerge(config_path=self.config_path, image_id=self.image_id)

    def step_input(self) -> ConvertInput:
        img = self.image
        merged = self.upstream_result(RegistryMerge)
        facts = self.upstream_result(Inspect)
        disk, overlay = Path(facts.source), merged.overlay  # with an overlay: copy the disk, commit it
        return ConvertInput(image_id=img.id, final_disk=img.final_disk, format=img.format, verify=img.verify,
                            src=overlay or disk, src_format="qcow2" if overlay else facts.format,
                            base=disk if overlay else None, base_format=facts.format,
                            image_dir=img.image_dir, overwrite=img.overwrite)

    def execute(self) -> Outcome[ConvertResult]:
        ghost = self.upstream_task(GhostConvert)
        if ghost is not None and (adopted := self._adopt(ghost.receipt())) is not None:
            return adopted
        res = convert_disk(self.step_input(), progress=lambda p: self.progress(p, f"converting {p:.0f}%"))
        read = self.upstream_result(Inspect).actual_size or 0
        return Outcome(res, outputs={"disk": res.output}, bytes_read=read)

    def _adopt(self, ghost_receipt: dict[str, Any] | None) -> Outcome[ConvertResult] | None:
        """ghost-convert's disk + the overlay committed into it as the final disk (written once),
        or None when it cannot be adopted (pipeline.steps.adopt)."""
        from pipeline.steps import adopt

        why = adopt.why_not(self.image, ghost_receipt)
        if why is not None or ghost_receipt is None:
            log.get().info("convert copies the disk", reason=why)
            return None
        merged = self.upstream_result(RegistryMerge)
        result = adopt.adopt_disk(self.image, ghost_receipt, merged.overlay,
                                  progress=lambda p: self.progress(p, f"committing {p:.0f}%"),
                                  committed=lambda: hooks.at("convert-commit", self))
        res = ConvertResult.from_dict(result)
        moved = int(result["adopted"]["overlay_allocated"])
        return Outcome(res, outputs={"disk": res.output}, bytes_read=moved, bytes_written=moved)


class XmlRender(ImageTask[DomainXml]):
    """Facts + config + host capabilities → ``domain.xml`` (validated model, fixed element order)."""

    step = Step.XML_RENDER
    result_type = DomainXml

    def upstream(self) -> Convert:
        return Convert(config_path=self.config_path, image_id=self.image_id)

    def step_input(self) -> RenderInput:
        img = self.image
        return RenderInput(image_id=img.id, image_dir=img.image_dir, disk_path=img.final_disk.absolute(),
                           domain=DomainConfig.from_config(img), force_tcg=self.force_tcg,
                           facts=self.upstream_result(Inspect),
                           installed_virtio=self.upstream_result(RegistryMerge).installed_virtio)

    def execute(self) -> Outcome[DomainXml]:
        res = render_domain(self.step_input())
        return Outcome(res, outputs={"domain_xml": res.domain_xml})


class Define(ImageTask[Defined]):
    """``domain.xml`` → libvirt domain (idempotent), optional boot check."""

    step = Step.DEFINE
    result_type = Defined

    def upstream(self) -> XmlRender:
        return XmlRender(config_path=self.config_path, image_id=self.image_id)

    def step_input(self) -> DefineInput:
        img = self.image
        return DefineInput(image_id=img.id, libvirt_uri=img.libvirt_uri, domain_name=img.domain_name,
                           image_dir=img.image_dir, autostart=img.autostart, boot_check=img.boot_check,
                           start=img.start, domain_xml=self.upstream_result(XmlRender).domain_xml)

    def execute(self) -> Outcome[Defined]:
        res = define_domain(self.step_input())
        return Outcome(res, outputs={"screenshot": res.screenshot} if res.screenshot else {})


def chain(config_path: str, image_id: str) -> list[ImageTask[Any]]:
    """The steps of one image in order (ghost-convert only for ``.gho`` sources)."""
    last: ImageTask[Any] | None = Define(config_path=config_path, image_id=image_id)
    steps: list[ImageTask[Any]] = []
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
