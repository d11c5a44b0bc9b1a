"""A VMware VM as a source: its disks checked before anything opens them, and the settings it gives.

:func:`vm_disks` takes the disks of a parsed ``.vmx`` (:mod:`pipeline.vmware.vmx`) in the VM's order and
checks each (stat and descriptor reads only, no program is run): the file exists and is a regular file,
it lies in the VM's own folder or one of the folders the config allows (``vm_disk_dirs``), after links
are resolved, and it is a standalone VMDK (:func:`pipeline.vmdk.parse_descriptor`); a delta disk of a
snapshot is refused naming the snapshot (from the VM's ``.vmsd``). The extents are checked later by
inspect's VMDK safety rules, exactly as for a ``.vmdk`` source.

:func:`vm_values` maps the VM's settings to config keys: ``memsize`` → ``memory_mib``, ``numvcpus`` →
``vcpus``, ``displayName`` → ``title``, ``annotation`` → ``description``, the first present NIC's
MAC → ``mac`` and its ``virtualDev`` → ``nic_model`` where KVM has the same device for the guest.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from pipeline import vmdk
from pipeline.core.errors import InputError
from pipeline.core.safeio import escape, file_kind
from pipeline.vmware.ovf import Ovf, OvfDisk
from pipeline.vmware.vmx import Vmx, VmxDisk, read_vmsd_names

#: VMware virtualDev → the KVM NIC model the guest already has a driver for (None: none in the guest
#: without VMware Tools, so the default by Windows version is kept)
NIC_MODELS: dict[str, str | None] = {"e1000": "e1000", "e1000e": "e1000", "vlance": None, "pcnet32": None,
                                     "vmxnet": None, "vmxnet2": None, "vmxnet3": None}


@dataclass(frozen=True)
class VmValue:
    key: str
    value: object
    note: str = ""  # why a VMX setting is not used, or how it was mapped


def _inside(real: str, roots: list[str]) -> bool:
    return any(real == r or real.startswith(r.rstrip(os.sep) + os.sep) for r in roots)


def vm_disks(vm: Vmx, allowed_dirs: tuple[Path, ...] = (), image_id: str | None = None) -> list[VmxDisk]:
    """The VM's disks, each checked; raises :class:`InputError` naming the .vmx line and the disk."""
    where = {"image_id": image_id, "step": "source"}
    if not vm.disks:
        raise InputError(f"{escape(vm.path, 300)}: the .vmx names no disk (no present ide/sata/scsi/nvme "
                         "slot with a fileName)", **where)
    roots = [os.path.realpath(vm.path.parent), *(os.path.realpath(d) for d in allowed_dirs)]
    snapshots: dict[str, str] | None = None
    for d in vm.disks:
        at = f"{escape(vm.path, 300)}:{d.line}: disk {d.slot} {escape(d.file_name, 200)!r}"
        try:
            st = os.stat(d.path)
        except OSError as e:
            why = e.strerror or "cannot be read"
            raise InputError(f"{at}: {why} ({escape(d.path, 300)})", **where) from None
        if (kind := file_kind(st.st_mode)) is not None:
            raise InputError(f"{at} is {kind}, not a disk file", **where)
        if not _inside(os.path.realpath(d.path), roots):
            raise InputError(f"{at} lies outside the VM's folder {escape(vm.path.parent, 300)}; refused "
                             "(allow its folder with vm_disk_dirs)", **where)
        if not d.path.name.lower().endswith(".vmdk"):
            raise InputError(f"{at} is not a .vmdk", **where)
        text, _ = vmdk.read_descriptor(d.path, image_id=image_id, step="source")
        _, parent = vmdk.referenced_files(text)
        if parent is not None or "parentfilenamehint" in text.lower():
            if snapshots is None:
                snapshots = {}
                for p in sorted(vm.path.parent.glob("*.vmsd"))[:4]:
                    snapshots.update(read_vmsd_names(p))
            name = snapshots.get(Path(parent or "").name.lower())
            snap = f"snapshot {name!r}" if name else "a snapshot"
            raise InputError(f"{at} is the delta disk of {escape(snap, 120)} (parent "
                             f"{escape(parent or '?', 120)}); consolidate the snapshots in VMware first "
                             "(Snapshot Manager → Delete All), then migrate", **where)
        vmdk.parse_descriptor(d.path, image_id=image_id, step="source")
    return list(vm.disks)


def vm_values(vm: Vmx) -> list[VmValue]:
    """What the VM says for the config keys, in a fixed order (a key it does not say is left out)."""
    nic = vm.nics[0] if vm.nics else None
    return _values(vm.memory_mib, vm.vcpus, vm.cores_per_socket, vm.display_name, vm.annotation,
                   nic.mac if nic else None, nic.model if nic else None,
                   f"ethernet{nic.index} ({nic.address_type})" if nic else "", vm.firmware)


def ovf_values(ovf: Ovf) -> list[VmValue]:
    """The same for an OVF appliance's virtual system."""
    nic = ovf.nics[0] if ovf.nics else None
    return _values(ovf.memory_mib, ovf.vcpus, ovf.cores_per_socket, ovf.name, ovf.annotation,
                   nic.mac if nic else None, nic.model if nic else None, "Network adapter 1 (OVF)",
                   ovf.firmware)


def _values(memory: int | None, vcpus: int | None, cores: int | None, title: str | None,
            description: str | None, mac: str | None, model: str | None, nic_name: str,
            firmware: str | None) -> list[VmValue]:
    out: list[VmValue] = []
    if memory is not None:
        out.append(VmValue("memory_mib", max(memory, 64),
                           "" if memory >= 64 else f"memsize {memory} raised to 64"))
    if vcpus is not None:
        c = cores or 1
        out.append(VmValue("vcpus", vcpus,
                           f"{vcpus // c} socket(s) × {c} core(s) in VMware" if c > 1 else ""))
    if title:
        out.append(VmValue("title", title.replace("\r", " ").replace("\n", " ")))
    if description:
        out.append(VmValue("description", description))
    if mac:
        out.append(VmValue("mac", mac, nic_name))
    if model:
        kvm = NIC_MODELS.get(model)
        out.append(VmValue("nic_model", kvm, f"VMware {model}" + (
            "" if kvm else ": no driver for it without VMware Tools, so by Windows version")))
    if firmware:
        out.append(VmValue("firmware", "uefi" if firmware == "efi" else "bios"))
    return out


def ovf_disks(ovf: Ovf, image_id: str | None = None) -> list[OvfDisk]:
    """An unpacked appliance's disks (already checked against its manifest by
    :func:`pipeline.vmware.ovf.verify_ovf_folder`), each a standalone, uncompressed VMDK."""
    where = {"image_id": image_id, "step": "source"}
    if not ovf.disks:
        raise InputError(f"{escape(ovf.path, 300)}: the OVF's virtual system has no disk", **where)
    for d in ovf.disks:
        at = f"{escape(ovf.path, 300)}: disk {d.disk_id} {escape(d.file.href, 200)!r}"
        if d.file.compression:
            raise InputError(f"{at} is {escape(d.file.compression, 20)}-compressed; not supported", **where)
        if not d.file.href.lower().endswith(".vmdk"):
            raise InputError(f"{at} is not a .vmdk", **where)
        vmdk.parse_descriptor(ovf.path.parent / d.file.href, image_id=image_id, step="source")
    return list(ovf.disks)
