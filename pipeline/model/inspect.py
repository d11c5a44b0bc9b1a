"""The inspect step's result: disk facts and guest facts (the JSON of ``inspect.json``)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pipeline.core.receipts import JsonRecord
from pipeline.model.guest import (
    BootGeometry,
    BootSettings,
    NetInterface,
    ToolService,
    static_warning,
    tools_warning,
)
from pipeline.model.hives import HiveFacts


@dataclass(frozen=True)
class VmdkExtent(JsonRecord):
    """One extent line of a VMDK descriptor, ``path`` resolved inside the source's folder."""

    access: str
    sectors: int
    type: str
    file: str
    path: str


@dataclass(frozen=True)
class InspectFacts(JsonRecord):
    """What inspect found: disk facts (qemu-img, VMDK descriptor) and guest facts (one appliance
    launch). The guest fields stay None when the guest was not recognised (``os == "unknown"``), the
    Windows ones (``systemroot`` ...) when it is not Windows. ``to_dict``/``from_dict`` give the JSON
    of ``inspect.json`` (and of ``gho2kvm inspect``)."""

    image_id: str | None = None
    source: str = ""
    format: str = "raw"
    virtual_size: int = 0
    actual_size: int | None = None
    backing_file: str | None = None
    check: Mapping[str, Any] | None = None
    create_type: str | None = None  # VMDK only
    extents: tuple[VmdkExtent, ...] = ()  # VMDK only
    os: str = "unknown"  # windows | unknown
    partition_table: str | None = None
    firmware: str = "bios"  # bios | uefi
    appliance_seconds: float | None = None
    os_type: str | None = None  # libguestfs' inspect-get-type
    root: str | None = None
    product_name: str | None = None
    major_version: int | None = None
    minor_version: int | None = None
    arch: str | None = None
    distro: str | None = None
    hostname: str | None = None
    systemroot: str | None = None  # Windows only from here on
    current_control_set: str | None = None
    drivers_present: Mapping[str, bool] | None = None  # guest.DRIVER_FILES → found in System32\drivers
    disk_signature: Mapping[str, Any] | None = None  # pipeline.guest.disksig.read_in_guest
    services: Mapping[str, int | None] | None = None  # guest.SERVICES → Start (None: absent)
    #: SYSTEM/SOFTWARE as found: base block, logs, replay, damage (pipeline.registry.hivefile)
    hives: tuple[HiveFacts, ...] = ()
    #: what the built-in change sets would meet in each hive ({hive: pipeline.registry.edits.snapshot})
    registry_snapshot: Mapping[str, Any] | None = None
    network: tuple[NetInterface, ...] = ()  # every Tcpip interface of the live set
    hypervisor_tools: tuple[ToolService, ...] = ()  # other hypervisors' tools installed
    boot_settings: BootSettings | None = None  # CrashControl, RealTimeIsUniversal, CPU drivers
    boot_geometry: BootGeometry | None = None  # the system partition's NTFS boot sector vs its MBR entry
    qemu_img_version: str | None = None

    @property
    def warnings(self) -> tuple[str, ...]:
        out = []
        for h in self.hives:
            if h.damaged:
                out.append(h.damage_line(self.image_id or "?"))
            elif h.warning:
                out.append(f"image '{self.image_id}': {h.warning}")
        found = (static_warning(self.network, restore=False),
                 tools_warning(self.hypervisor_tools, disable_vmware=False))
        out += [w for w in found if w]
        return tuple(out)

    def hive(self, name: str) -> HiveFacts | None:
        return next((h for h in self.hives if h.name.upper() == name.upper()), None)

    @property
    def is_windows(self) -> bool:
        return self.os == "windows"

    @property
    def control_set(self) -> str:
        """The live control set (``ControlSet001`` when unknown)."""
        return self.current_control_set or "ControlSet001"
