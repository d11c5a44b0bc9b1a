"""Every closed choice of gho2kvm, once: config validation, the domain model, the Ghost argv builder
and the boot check take their allowed values from here.

The members are ``StrEnum``s: they compare equal to (and format as) their plain value, so a config
value, a receipt field and an XML attribute are the same string.

Disk defaults suit a production KVM host with the disk on local storage: ``cache='none'`` (no host
page cache, O_DIRECT; safe on power loss) with ``io='native'`` (Linux AIO, which qemu only allows on
O_DIRECT files). Disks on tmpfs (no O_DIRECT) need ``disk_cache: writeback`` + ``disk_io: threads``.
"""

from __future__ import annotations

from enum import StrEnum


class Choice(StrEnum):
    """A closed choice; its ``repr`` is the plain value's (``'qcow2'``), as in messages and the
    "input changed" lines of ``plan`` that quote old and new values."""

    def __repr__(self) -> str:
        return repr(self.value)


class DiskFormat(Choice):
    """``format``: the final disk's format."""

    RAW = "raw"
    QCOW2 = "qcow2"


class DiskBus(Choice):
    IDE = "ide"
    SATA = "sata"
    VIRTIO = "virtio"


class NicModel(Choice):
    RTL8139 = "rtl8139"
    E1000 = "e1000"
    VIRTIO = "virtio"


class DiskCache(Choice):
    """``disk_cache``; ``default`` leaves the attribute out (libvirt's own default)."""

    NONE = "none"
    WRITETHROUGH = "writethrough"
    WRITEBACK = "writeback"
    DIRECTSYNC = "directsync"
    UNSAFE = "unsafe"
    DEFAULT = "default"


class DiskIo(Choice):
    NATIVE = "native"
    THREADS = "threads"
    IO_URING = "io_uring"
    DEFAULT = "default"


#: qemu refuses aio=native without cache.direct=on
IO_NATIVE_CACHES = (DiskCache.NONE, DiskCache.DIRECTSYNC)
DEFAULT_DISK_CACHE = DiskCache.NONE
DEFAULT_DISK_IO = DiskIo.NATIVE


class Firmware(Choice):
    BIOS = "bios"
    UEFI = "uefi"


class Arch(Choice):
    """Guest architectures a domain is built for (libvirt's names)."""

    X86_64 = "x86_64"
    I686 = "i686"


class GhostBackend(Choice):
    """``ghost.backend``: Ghost's own executable, or the native reader."""

    EXE = "exe"
    NATIVE = "native"


class PathStyle(Choice):
    """``ghost.path_style``: how the Ghost process spells paths."""

    WINE = "wine"
    POSIX = "posix"
    WINDOWS = "windows"


class VmdkType(Choice):
    """``ghost.vmdk_type``: what Ghost writes; ``auto`` = flat when the final disk is raw and no split
    is asked (its one extent is then adopted as the final disk: written once), sparse otherwise."""

    AUTO = "auto"
    SPARSE = "sparse"
    FLAT = "flat"


class Adapter(Choice):
    """``ghost.adapter``: the VMDK's virtual adapter (Ghost's ``-VMDKADAPTER``)."""

    IDE = "ide"
    LSILOGIC = "lsilogic"
    BUSLOGIC = "buslogic"


class BootExpect(Choice):
    """``boot_check.expect``: ``any`` = every verdict that is not a failure."""

    ANY = "any"
    PROMPT = "prompt"
    DESKTOP = "desktop"


class Scheduler(Choice):
    """``settings.scheduler`` / ``--scheduler``: luigi's local scheduler or a central luigid."""

    LOCAL = "local"
    CENTRAL = "central"


class VmwareTools(Choice):
    """``vmware_tools``: leave VMware's services and drivers as they are, or set them to Start=4."""

    KEEP = "keep"
    DISABLE = "disable"


class NetworkRestore(Choice):
    """``network_restore``: ``static`` re-applies the old static addresses on the new NIC at first boot."""

    OFF = "off"
    STATIC = "static"


class Step(Choice):
    """The steps of one image, in order: the one list of step names (tasks, errors, the summary)."""

    GHOST_CONVERT = "ghost-convert"
    INSPECT = "inspect"
    REGISTRY_MERGE = "registry-merge"
    CONVERT = "convert"
    XML_RENDER = "xml-render"
    DEFINE = "define"


def values(choice: type[Choice]) -> tuple[str, ...]:
    """The allowed values of ``choice`` as plain strings, in declaration order."""
    return tuple(m.value for m in choice)
