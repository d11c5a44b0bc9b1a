"""``source: VM.vmx``: the image's disk and settings from the VMware VM, before any step runs.

:func:`resolve_config` is the one place a VM source becomes an ordinary image: ``source`` becomes the
VM's system disk (checked by :func:`pipeline.vmware.vm.vm_disks`), and every key the VM says
(:func:`pipeline.vmware.vm.vm_values`) that the config does not set takes the VM's value; the config's
own value always wins. ``origins`` records where each value came from (``vmx``, ``config`` or
``default``) for ``gho2kvm plan``. The VM's MAC is kept as VMware wrote it (``00:50:56:…``,
``00:0c:29:…``) so that DHCP reservations still match; ``mac:`` in the config stays ``52:54:00:…``.

Until an image can carry several disks, a VM with more than one disk is refused (one line naming the
.vmx and its disks) rather than migrated without its data disks.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from pipeline.core.choices import NicModel
from pipeline.core.config import VM_SUFFIXES, Config, ImageConfig
from pipeline.core.errors import InputError
from pipeline.core.safeio import escape
from pipeline.vmware.vm import vm_disks, vm_values
from pipeline.vmware.vmx import read_vmx

#: the keys a VM can give, in the order plan shows them
VM_KEYS = ("memory_mib", "vcpus", "title", "description", "mac", "nic_model")


def resolve_image(img: ImageConfig) -> ImageConfig:
    """``img`` with a ``.vmx`` source resolved (any other image is returned as it is)."""
    if not img.source.name.lower().endswith(VM_SUFFIXES):
        return img
    vm = read_vmx(img.source)
    disks = vm_disks(vm, img.vm_disk_dirs, img.id)
    system = vm.boot_disk or disks[0]
    if len(disks) > 1:
        names = ", ".join(f"{d.slot} {d.file_name}" for d in disks)
        raise InputError(f"{escape(img.source, 300)}: the VM has {len(disks)} disks ({escape(names, 300)}); "
                         "several disks per image are not supported yet", image_id=img.id, step="source")
    changes: dict[str, Any] = {}
    origins: list[tuple[str, str, str]] = [("source", str(system.path), f"vmx {system.slot}")]
    said = {v.key: v for v in vm_values(vm)}
    for key in VM_KEYS:
        v = said.get(key)
        if key in img.given:
            origins.append((key, str(getattr(img, key)), "config"
                            + (f" (the VM says {v.value})" if v is not None and v.value != getattr(img, key)
                               else "")))
        elif v is not None:
            changes[key] = NicModel(str(v.value)) if key == "nic_model" and v.value else v.value
            origins.append((key, str(v.value), "vmx" + (f": {v.note}" if v.note else "")))
        else:
            origins.append((key, str(getattr(img, key)), "default"))
    if "firmware" in said:
        origins.append(("firmware", str(said["firmware"].value), "vmx (the domain's firmware is the one "
                                                                   "inspection finds on the disk)"))
    for nic in vm.nics[1:]:
        origins.append((f"ethernet{nic.index}", nic.mac or "?", "vmx: not migrated (one NIC per domain)"))
    for line in vm.info:
        origins.append(("ignored", line, "vmx"))
    return dataclasses.replace(img, source=system.path, vm=img.source, origins=tuple(origins), **changes)


def resolve_config(cfg: Config) -> Config:
    """``cfg`` with every VM source resolved (:func:`resolve_image`); the first bad one raises."""
    if not any(i.source.name.lower().endswith(VM_SUFFIXES) for i in cfg.images):
        return cfg
    return dataclasses.replace(cfg, images=tuple(resolve_image(i) for i in cfg.images))
