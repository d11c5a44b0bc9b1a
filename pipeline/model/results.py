"""What each step returns (the ``result`` of its receipt); inspect's is :mod:`pipeline.model.inspect`."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.core.receipts import JsonRecord
from pipeline.model.guest import Change


@dataclass(frozen=True)
class GhostConvertResult:
    """The disk the next steps read and the backend's own record (``details``: Ghost's argv, spans
    and outputs, or the native reader's partitions, files and warnings)."""

    disk: Path
    disk_format: str  # vmdk | raw | qcow2
    backend: str  # exe | native
    details: Mapping[str, Any] = field(default_factory=dict)

    @property
    def warnings(self) -> tuple[str, ...]:
        return tuple(self.details.get("warnings") or ())

    @property
    def outputs(self) -> dict[str, Path]:
        """The files made (name → path): every Ghost output, or the native reader's disk."""
        if self.backend == "exe":
            return {Path(o["path"]).name: Path(o["path"]) for o in self.details.get("outputs", [])}
        return {"disk": self.disk}

    def to_dict(self) -> dict[str, Any]:
        return {**self.details, "backend": self.backend, "disk": str(self.disk),
                "disk_format": self.disk_format}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> GhostConvertResult:
        details = {k: v for k, v in data.items() if k not in ("backend", "disk", "disk_format")}
        return cls(disk=Path(data["disk"]), disk_format=str(data["disk_format"]),
                   backend=str(data.get("backend", "exe")), details=details)


@dataclass(frozen=True)
class ConvertResult(JsonRecord):
    input: Path
    input_format: str
    output: Path
    format: str
    verified: bool
    qemu_img_version: str | None = None
    convert_seconds: float | None = None
    verify_seconds: float | None = None
    sync_seconds: float | None = None
    commit_seconds: float | None = None  # the overlay committed into the copy (or the adopted disk)
    adopted: dict[str, Any] | None = None

    @property
    def warnings(self) -> tuple[str, ...]:
        return ()


@dataclass(frozen=True)
class MergeResult(JsonRecord):
    """What registry-merge did (``skipped`` for a guest not recognised as Windows: no overlay)."""

    skipped: bool
    overlay: Path | None
    warnings: tuple[str, ...] = ()
    hives: Mapping[str, Any] | None = None  # hive name → {guest_path, keys, values, verified}
    backing_file: Path | None = None
    backing_format: str | None = None
    current_control_set: str | None = None
    registry_variant: str | None = None
    disk_signature: Mapping[str, Any] | None = None  # pipeline.guest.disksig.reconcile
    virtio: Mapping[str, Any] | None = None  # {"drivers": tree, "installed": {driver: {from, to, sha256}}}
    guest_changes: tuple[Change, ...] = ()  # pipeline.guest.fixes: each edit beyond the change sets
    guest_files: tuple[Mapping[str, str], ...] = ()  # files written into the guest: {path, sha256, why}
    boot_geometry: Mapping[str, Any] | None = None  # pipeline.guest.ntfsgeom.reconcile
    appliance_launches: int = 0
    appliance_shared: bool = False
    appliance_seconds: float | None = None
    qemu_img_version: str | None = None
    libguestfs_version: str | None = None

    @property
    def installed_virtio(self) -> tuple[str, ...]:
        """The virtio drivers copied into the guest."""
        return tuple((self.virtio or {}).get("installed") or {})


@dataclass(frozen=True)
class DomainXml(JsonRecord):
    domain_xml: Path
    name: str
    uri: str
    disk_bus: str
    nic_model: str
    memory_mib: int
    warnings: tuple[str, ...] = ()


@dataclass(frozen=True)
class Defined(JsonRecord):
    action: str  # created | updated | unchanged
    name: str
    uuid: str
    uri: str
    autostart: bool = False
    boot_check: Mapping[str, Any] | None = None  # the verdict (pipeline.tools.bootcheck.boot_check)
    started: Mapping[str, Any] | None = None  # start: true without a boot check
    screenshot: Path | None = None  # the boot check's last screen

    @property
    def warnings(self) -> tuple[str, ...]:
        return ()
