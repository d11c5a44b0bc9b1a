"""What a Windows guest can drive, decided from inspection facts. Pure: no tools, no I/O.

One place for the per-version knowledge:

* the **family** of a Windows version: ``nt5`` (2000, XP, 2003: 5.x), ``nt6`` (Vista, 7, 2008,
  2008 R2: 6.0-6.1), ``nt62`` (8, 8.1, 10, 11, 2012 and later: 6.2+ and 10.x);
* which built-in registry fix set a family gets (:mod:`pipeline.registry.builtin`);
* the driver files and services inspection looks for;
* whether the configured disk bus and NIC model can work (:func:`decide`): a bus the guest has no
  driver for is refused with one line naming image, field, guest and fix; a NIC without a driver
  is a warning;
* the virtio-win folder names of a guest (``viostor/<os>/<arch>``) and memory defaults.

``facts`` is what the inspect step found (:class:`pipeline.model.inspect.InspectFacts`: ``os``,
``major_version``, ``minor_version``, ``product_name``, ``arch``, ``drivers_present``, ``services``).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the type only: this module stays free of tools at run time
    from pipeline.model.inspect import InspectFacts

NT5, NT6, NT62 = "nt5", "nt6", "nt62"

#: files looked for in ``System32\drivers`` by inspect (True/False each in ``drivers_present``)
DRIVER_FILES = ("atapi.sys", "intelide.sys", "pciide.sys", "pciidex.sys", "msahci.sys", "storahci.sys",
                "viostor.sys", "netkvm.sys")
#: services looked for in the live control set by inspect (``services``: name -> Start or None)
SERVICES = ("atapi", "intelide", "pciide", "msahci", "storahci", "viostor", "netkvm")

#: the services whose ``Start`` decides whether the guest boots from QEMU's disk controller on a bus
#: (PIIX3 IDE 8086:7010 → intelide with its channels on atapi; ICH9 AHCI → the inbox AHCI driver);
#: the built-in fix sets change only these Starts, and fill in the others only where absent
BOOT_SERVICES: dict[str, dict[str, tuple[str, ...]]] = {
    NT5: {"ide": ("atapi", "intelide"), "sata": ()},
    NT6: {"ide": ("atapi", "intelide"), "sata": ("msahci",)},
    NT62: {"ide": ("atapi", "intelide"), "sata": ("storahci",)},
}


def boot_services(fam: str, bus: str) -> tuple[str, ...]:
    """The services of :data:`BOOT_SERVICES` for ``bus``; ``virtio`` counts as ``ide`` (the disk
    falls back to IDE when no viostor is found, and the CD-ROM is always on IDE)."""
    return BOOT_SERVICES.get(fam, BOOT_SERVICES[NT5]).get("ide" if bus == "virtio" else bus, ())


#: the IDE drivers every fix set points at (missing ones are a warning of registry-merge)
IDE_DRIVERS = ("atapi.sys", "intelide.sys", "pciide.sys", "pciidex.sys")
#: the inbox AHCI driver per family (None: the family has none)
AHCI_DRIVER: dict[str, str | None] = {NT5: None, NT6: "msahci.sys", NT62: "storahci.sys"}

VIRTIO_DRIVERS = {"disk": "viostor", "nic": "netkvm"}
VIRTIO_FIELD = "virtio.drivers"
#: the virtio drivers registry-merge can install offline, per family: NT 5.x-6.1 bind both through
#: CriticalDeviceDatabase; 6.2+ read DriverDatabase instead, which takes the boot-start viostor, but
#: not netkvm (an NDIS miniport needs the network set-up PnP and the inf do in the running guest)
VIRTIO_OFFLINE: dict[str, tuple[str, ...]] = {NT5: ("viostor", "netkvm"), NT6: ("viostor", "netkvm"),
                                              NT62: ("viostor",)}

#: memory (MiB) when ``memory_mib`` is not set: the vendor's recommended minimum, rounded up
MEMORY_DEFAULT_MIB = {NT5: 512, NT6: 2048, NT62: 4096, None: 512}
MEMORY_DEFAULT_MIB_32BIT = {NT6: 1024, NT62: 2048}


def family(major: int | None, minor: int | None = None) -> str | None:
    """``nt5``/``nt6``/``nt62`` for a Windows NT version, None when unknown."""
    if major is None or major < 5:
        return None
    if major == 5:
        return NT5
    if major == 6 and (minor or 0) < 2:
        return NT6
    return NT62


def facts_family(facts: InspectFacts) -> str | None:
    if not facts.is_windows:
        return None
    return family(facts.major_version, facts.minor_version)


def is_server(facts: InspectFacts) -> bool:
    return "server" in str(facts.product_name or "").lower()


def guest_name(facts: InspectFacts) -> str:
    """A short human name: ``Windows XP``, ``Windows Server 2003``, ``Windows 7``, ``Windows 10``."""
    if not facts.is_windows:
        return f"a non-Windows guest ({facts.os_type or 'unknown'})"
    major, minor = int(facts.major_version or 0), int(facts.minor_version or 0)
    product = str(facts.product_name or "")
    m = re.search(r"Windows(?: Server)? (XP|Vista|\d+(?:\.\d)?(?: R2)?)", product)
    if m:
        return "Windows " + ("Server " if is_server(facts) else "") + m.group(1)
    names = {(5, 0): "Windows 2000", (5, 1): "Windows XP", (5, 2): "Windows Server 2003",
             (6, 0): "Windows Vista", (6, 1): "Windows 7", (6, 2): "Windows 8", (6, 3): "Windows 8.1",
             (10, 0): "Windows 10"}
    return names.get((major, minor), f"Windows NT {major}.{minor}")


def arch_of(facts: InspectFacts) -> str:
    """``x86`` or ``amd64`` (virtio-win's folder names)."""
    return "amd64" if str(facts.arch or "") in ("x86_64", "amd64") else "x86"


def virtio_os_dirs(facts: InspectFacts) -> tuple[str, ...]:
    """virtio-win's ``<os>`` folder names for this guest, best first (empty: none known)."""
    major, minor = facts.major_version, facts.minor_version or 0
    server = is_server(facts)
    if major == 5:
        return ("xp",) if minor == 1 else ("2k3",) if minor == 2 else ()
    if major == 6:
        table = {0: ("2k8",), 1: ("2k8R2",) if server else ("w7",), 2: ("2k12",) if server else ("w8",),
                 3: ("2k12R2",) if server else ("w8.1",)}
        return table.get(minor, ())
    if major == 10:
        if not server:
            return ("w10", "w11")
        year = re.search(r"20(1[69]|2\d)", str(facts.product_name or ""))
        return (f"2k{year.group(1)}",) if year else ("2k16", "2k19", "2k22")
    return ()


def default_memory_mib(facts: InspectFacts) -> int:
    fam = facts_family(facts)
    if fam in MEMORY_DEFAULT_MIB_32BIT and arch_of(facts) == "x86":
        return MEMORY_DEFAULT_MIB_32BIT[fam]
    return MEMORY_DEFAULT_MIB[fam]


def default_nic(facts: InspectFacts) -> str:
    """rtl8139 for 5.x (inbox driver), e1000 for 6.x and later (inbox driver on every edition)."""
    return "e1000" if facts_family(facts) in (NT6, NT62) else "rtl8139"


def has_driver(facts: InspectFacts, driver_file: str) -> bool | None:
    """True/False when inspection looked for ``driver_file`` in System32\\drivers, None if it did not."""
    present = facts.drivers_present or {}
    return present.get(driver_file) if driver_file in present else None


def has_virtio(facts: InspectFacts, driver: str) -> bool:
    """The guest already has the virtio driver (file and service), e.g. installed before migration."""
    services = facts.services or {}
    return bool(has_driver(facts, f"{driver}.sys")) and services.get(driver) is not None


@dataclass(frozen=True)
class Readiness:
    """What the domain gets, and why: the bus and NIC to render, refusals and warnings."""

    disk_bus: str
    nic_model: str
    refusals: tuple[str, ...] = ()
    warnings: tuple[str, ...] = ()

    @property
    def virtio_warnings(self) -> tuple[str, ...]:
        """The warnings about the ``virtio.drivers`` tree (registry-merge's part; the rest belong to
        xml-render, where the domain is decided)."""
        return tuple(w for w in self.warnings if f": {VIRTIO_FIELD}: " in w)

    def raise_refusals(self, image_id: str, step: str) -> None:
        if self.refusals:
            from pipeline.core.errors import InputError

            raise InputError(self.refusals[0], image_id=image_id, step=step)


def virtio_switch_supported(facts: InspectFacts, driver: str = "viostor") -> bool:
    """registry-merge can install virtio ``driver`` offline in this guest (:data:`VIRTIO_OFFLINE`)."""
    return driver in VIRTIO_OFFLINE.get(facts_family(facts) or "", ())


def decide(image_id: str, disk_bus: str, nic_model: str | None, facts: InspectFacts, *,
           virtio_tree: str | None = None, installed: Iterable[str] | None = None) -> Readiness:
    """Decide the disk bus and NIC model for a guest.

    ``virtio_tree`` is the configured ``virtio.drivers`` (switch-over wanted); ``installed`` the
    virtio drivers registry-merge put into the guest (None: not known yet, e.g. at plan time before
    registry-merge ran). Unknown guests (not inspected as Windows) get what is configured.
    """
    fam = facts_family(facts)
    nic = nic_model or default_nic(facts)
    if fam is None:
        return Readiness(disk_bus, nic)
    name = guest_name(facts)
    prefix = f"image '{image_id}'"
    refusals: list[str] = []
    warnings: list[str] = []
    done = None if installed is None else set(installed)
    tree_note = f" ({'/'.join(virtio_os_dirs(facts)) or 'no folder'}/{arch_of(facts)})"

    def virtio_ready(driver: str) -> bool | None:
        """True: usable; None: depends on registry-merge (not run yet); False: not available."""
        if has_virtio(facts, driver):
            return True
        if virtio_tree is None:
            return False
        if not virtio_switch_supported(facts, driver):
            return False
        if done is None:
            return None
        return driver in done

    bus = disk_bus
    if disk_bus == "virtio" or virtio_tree is not None:
        ready = virtio_ready("viostor")
        fallback = disk_bus if disk_bus != "virtio" else "ide"
        if ready is not False:
            bus = "virtio"
        elif virtio_tree is None:
            refusals.append(f"{prefix}: disk_bus 'virtio': {name} has no viostor.sys (virtio block driver); "
                            f"use ide, or set virtio.drivers to a virtio-win ISO or folder")
        else:
            bus = fallback
            warnings.append(_virtio_missing(prefix, "viostor", name, virtio_tree, tree_note, facts,
                                            f"disk stays on {fallback}"))
    if bus == "sata":
        ahci = AHCI_DRIVER.get(fam)
        if ahci is None:
            refusals.append(f"{prefix}: disk_bus 'sata': {name} has no AHCI driver; use ide, or virtio with "
                            f"virtio.drivers")
        elif has_driver(facts, ahci) is False:
            refusals.append(f"{prefix}: disk_bus 'sata': {name} has no {ahci} in System32\\drivers (its AHCI "
                            f"driver); use ide")

    model = nic
    if nic == "virtio" or virtio_tree is not None:
        ready = virtio_ready("netkvm")
        fallback = nic if nic != "virtio" else default_nic(facts)
        if ready is not False:
            model = "virtio"
        elif virtio_tree is None:
            warnings.append(f"{prefix}: nic_model 'virtio': {name} has no netkvm.sys (virtio network "
                            f"driver); the guest will have no network until it is installed (or use "
                            f"{default_nic(facts)}, or virtio.drivers)")
        else:
            model = fallback
            warnings.append(_virtio_missing(prefix, "netkvm", name, virtio_tree, tree_note, facts,
                                            f"NIC stays {fallback}"))
    if model == "e1000" and fam == NT5:
        warnings.append(f"{prefix}: nic_model 'e1000': {name} ships no Intel PRO/1000 driver; the guest "
                        f"has no network until one is installed (or use rtl8139)")
    if model == "rtl8139" and (fam == NT62 or (fam == NT6 and arch_of(facts) == "amd64")):
        warnings.append(f"{prefix}: nic_model 'rtl8139': {name} ({arch_of(facts)}) ships no RTL8139 driver; "
                        f"the guest has no network until one is installed (or use e1000)")
    return Readiness(bus, model, tuple(refusals), tuple(warnings))


def _virtio_missing(prefix: str, driver: str, name: str, tree: str, tree_note: str,
                    facts: InspectFacts, outcome: str) -> str:
    if not virtio_switch_supported(facts, driver):
        why = (f"{name} sets up a {driver} device through PnP in the running guest (its network "
               f"configuration cannot be written offline); install it there (pnputil /add-driver "
               f"{driver}.inf /install, e.g. from cdrom: virtio-win.iso) and switch then")
    else:
        why = f"no {driver}{tree_note} in {tree}"
    return f"{prefix}: {VIRTIO_FIELD}: {why}; {outcome}"
