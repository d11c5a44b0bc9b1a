"""``source: VM.vmx`` (or an unpacked ``VM.ovf``): the image's disk and settings from the VMware VM,
before any step runs.

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

from pipeline.core.config import IMAGE_RULES, VM_SUFFIXES, Config, ImageConfig
from pipeline.core.errors import InputError
from pipeline.core.safeio import escape
from pipeline.vmware.ovf import verify_ovf_folder
from pipeline.vmware.vm import ovf_disks, ovf_values, vm_disks, vm_values
from pipeline.vmware.vmx import read_vmx

#: the keys a VM can give, in the order plan shows them
VM_KEYS = ("memory_mib", "vcpus", "title", "description", "mac", "nic_model")


def resolve_image(img: ImageConfig) -> ImageConfig:
    """``img`` with a ``.vmx`` or ``.ovf`` source resolved (any other image is returned as it is)."""
    low = img.source.name.lower()
    if not low.endswith(VM_SUFFIXES):
        return img
    info: list[tuple[str, str, str]] = []
    if low.endswith(".ovf"):
        appliance = verify_ovf_folder(img.source)
        odisks = ovf_disks(appliance, img.id)
        names = [f"{d.bus}{d.controller}:{d.unit} {d.file.href}" for d in odisks]
        system_path, system_slot, said_list = img.source.parent / odisks[0].file.href, names[0].split()[0], \
            ovf_values(appliance)
        info += [("ignored", line, "ovf") for line in appliance.info]
        info += [("nic", n.mac or "?", "ovf: not migrated (one NIC per domain)") for n in appliance.nics[1:]]
        kind = "ovf"
    else:
        vm = read_vmx(img.source)
        disks = vm_disks(vm, img.vm_disk_dirs, img.id)
        system = vm.boot_disk or disks[0]
        names = [f"{d.slot} {d.file_name}" for d in disks]
        system_path, system_slot, said_list = system.path, system.slot, vm_values(vm)
        info += [(f"ethernet{n.index}", n.mac or "?", "vmx: not migrated (one NIC per domain)")
                 for n in vm.nics[1:]]
        info += [("ignored", line, "vmx") for line in vm.info]
        kind = "vmx"
    if len(names) > 1:
        listed = escape(", ".join(names), 300)
        raise InputError(f"{escape(img.source, 300)}: the VM has {len(names)} disks ({listed}); "
                         "several disks per image are not supported yet", image_id=img.id, step="source")
    changes: dict[str, Any] = {}
    origins: list[tuple[str, str, str]] = [("source", str(system_path), f"{kind} {system_slot}")]
    said = {v.key: v for v in said_list}
    for key in VM_KEYS:
        v = said.get(key)
        if key in img.given:
            origins.append((key, str(getattr(img, key)), "config"
                            + (f" (the VM says {v.value})" if v is not None and v.value != getattr(img, key)
                               else "")))
        elif v is not None:
            value = v.value
            if key != "mac" and value is not None:  # the config's own rule (mac: VMware's MACs are kept)
                try:
                    value = IMAGE_RULES[key](value)
                except ValueError as e:
                    said_value = escape(str(v.value), 40)
                    raise InputError(f"{escape(img.source, 300)}: the VM's {key} {said_value} is not usable: "
                                     f"{e}", image_id=img.id, step="source") from None
            changes[key] = value
            origins.append((key, str(v.value), kind + (f": {v.note}" if v.note else "")))
        else:
            origins.append((key, str(getattr(img, key)), "default"))
    if "firmware" in said:
        origins.append(("firmware", str(said["firmware"].value), f"{kind} (the domain's firmware is the one "
                                                                   "inspection finds on the disk)"))
    origins += info
    return dataclasses.replace(img, source=system_path, vm=img.source, origins=tuple(origins), **changes)


def resolve_config(cfg: Config) -> Config:
    """``cfg`` with every VM source resolved (:func:`resolve_image`); the first bad one raises."""
    if not any(i.source.name.lower().endswith(VM_SUFFIXES) for i in cfg.images):
        return cfg
    return dataclasses.replace(cfg, images=tuple(resolve_image(i) for i in cfg.images))
