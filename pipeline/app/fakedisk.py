"""Builder of small fake-but-real Windows disks, for the demo and the tests.

A real partition table (MBR, or GPT with an EFI system partition for UEFI), a real NTFS file system
with ``Windows/System32/cmd.exe`` (a real PE file shipped by pip), real ``SYSTEM``/``SOFTWARE`` hives
and dummy IDE drivers: enough for libguestfs inspection and for the registry step. One appliance
launch per disk; VMDK subformats are made from the raw disk with ``qemu-img convert``.

``python -m pipeline.app.fakedisk OUT [--product ...]`` builds one (reused if already built).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from pipeline.core import atomic
from pipeline.core.settings import resolve
from pipeline.registry import hive
from pipeline.steps.inspect import ESP_GUID
from pipeline.tools.guestfs import Guestfish
from pipeline.tools.run import run

STEP = "fakedisk"
#: identity of the recipes (this file): a changed recipe rebuilds cached disks
_RECIPE = hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:12]
VMDK_SUBFORMATS = ("monolithicSparse", "monolithicFlat", "twoGbMaxExtentSparse", "streamOptimized")


@dataclass(frozen=True)
class DiskSpec:
    windows: bool = True
    product: str = "Microsoft Windows XP"
    version: str = "5.1"  # CurrentVersion
    build: str = "2600"
    control_set: int = 1
    hostname: str = "XPDEMO"
    partition_table: str = "mbr"  # mbr | gpt
    uefi: bool = False  # gpt + ESP with \EFI\Microsoft\Boot\bootmgfw.efi
    size_mib: int = 64
    arch: str = "i386"  # i386 | x86_64
    drivers: bool = True
    output: str = "raw"  # raw | qcow2 | one of VMDK_SUBFORMATS
    #: MBR disks: MountedDevices \DosDevices\C: names this disk signature (and the partition's offset)
    mounted_c_signature: int | None = None
    #: .reg lines (key headers + values, no header line) added to the SYSTEM / SOFTWARE hive
    system_reg_extra: tuple[str, ...] = ()
    software_reg_extra: tuple[str, ...] = ()
    #: files uploaded into ``WINDOWS/system32/config/`` last: (name, host path), e.g. a prebuilt
    #: ``system`` hive replacing the generated one, or its ``system.LOG1`` / ``system.LOG2``
    config_files: tuple[tuple[str, str], ...] = ()

    def stamp(self) -> dict[str, object]:
        """What identifies a built disk (fields added later are left out at their default, so that
        disks built before them stay valid)."""
        d = asdict(self)
        for late in ("mounted_c_signature", "system_reg_extra", "software_reg_extra", "config_files"):
            if d[late] in (None, (), []):
                del d[late]
        if self.config_files:  # a prebuilt file identifies the disk by its content
            d["config_files"] = [[name, hashlib.sha256(Path(path).read_bytes()).hexdigest()]
                                 for name, path in self.config_files]
        d["recipe"] = _RECIPE  # what the disk holds also depends on this module's code
        return d

    def key(self) -> str:
        return hashlib.sha256(json.dumps(self.stamp(), sort_keys=True).encode()).hexdigest()[:16]


XP = DiskSpec()
WIN7_UEFI = DiskSpec(product="Windows 7 Professional", version="6.1", build="7601", control_set=2,
                     hostname="WIN7DEMO", partition_table="gpt", uefi=True, size_mib=128, arch="x86_64")
W2003 = DiskSpec(product="Microsoft Windows Server 2003", version="5.2", build="3790", hostname="SRV2003")
WIN7 = DiskSpec(product="Windows 7 Professional", version="6.1", build="7601", control_set=2,
                hostname="WIN7BIOS", arch="x86_64")
#: Windows 10 keeps CurrentVersion 6.3 and gives the real version in CurrentMajor/MinorVersionNumber
WIN10 = DiskSpec(product="Windows 10 Pro", version="10.0", build="19045", control_set=1, hostname="WIN10",
                 arch="x86_64")


def _version(spec: DiskSpec) -> tuple[int, int]:
    major, _, minor = spec.version.partition(".")
    return int(major), int(minor or 0)


def driver_files(spec: DiskSpec) -> tuple[str, ...]:
    """The boot storage drivers the Windows version of ``spec`` ships in System32\\drivers."""
    if not spec.drivers:
        return ()
    v = _version(spec)
    ahci = ("storahci.sys",) if v >= (6, 2) else ("msahci.sys",) if v >= (6, 0) else ()
    return ("atapi.sys", "intelide.sys", "pciide.sys", "pciidex.sys", *ahci)


def _storage_services(spec: DiskSpec) -> list[tuple[str, int]]:
    """Services as a fresh install on an IDE machine leaves them: the AHCI driver off (Start=3)."""
    v = _version(spec)
    if v < (6, 0):
        return []
    ahci = "storahci" if v >= (6, 2) else "msahci"
    return [(ahci, 3), ("pciide", 3), ("intelide", 3)]


def pe_file(arch: str) -> Path:
    """A real PE executable for ``arch``: distlib's Windows launchers, shipped in PyPI's pip.

    (Debian's own pip wheel strips them; ``make setup`` upgrades the venv's pip from PyPI.)
    """
    import pip

    name = "t32.exe" if arch == "i386" else "t64.exe"
    candidates = [Path(pip.__file__).parent / "_vendor" / "distlib" / name]
    try:
        import distlib

        candidates.append(Path(distlib.__file__).parent / name)
    except ImportError:
        pass
    for path in candidates:
        if path.is_file():
            return path
    raise FileNotFoundError(f"no PE file {name} found (looked in {', '.join(map(str, candidates))}); "
                            f"upgrade pip from PyPI: .venv/bin/pip install --upgrade pip")


def _reg(lines: list[str]) -> str:
    """A .reg text; every key's missing ancestors are emitted first (hivexregedit needs them)."""
    out: list[str] = []
    seen: set[str] = set()
    for line in lines:
        if line.startswith("[") and line.endswith("]"):
            parts = line[1:-1].split("\\")
            for depth in range(3, len(parts)):  # below HKEY_LOCAL_MACHINE\<hive>
                parent = "\\".join(parts[:depth])
                if parent not in seen:
                    seen.add(parent)
                    out += [f"[{parent}]", ""]
            seen.add(line[1:-1])
        out.append(line)
    return "Windows Registry Editor Version 5.00\n\n" + "\n".join(out) + "\n"


def system_reg(spec: DiskSpec) -> str:
    lines = [
        r"[HKEY_LOCAL_MACHINE\SYSTEM\Select]",
        f'"Current"=dword:{spec.control_set:08x}',
        f'"Default"=dword:{spec.control_set:08x}',
        f'"LastKnownGood"=dword:{spec.control_set:08x}',
        '"Failed"=dword:00000000',
        "",
    ]
    # every control set exists, like on a real machine; only the current one is live
    for n in sorted({1, spec.control_set}):
        s = f"ControlSet{n:03d}"
        lines += [
            rf"[HKEY_LOCAL_MACHINE\SYSTEM\{s}\Control\CriticalDeviceDatabase]",
            "",
            rf"[HKEY_LOCAL_MACHINE\SYSTEM\{s}\Control\ComputerName\ComputerName]",
            f'"ComputerName"="{spec.hostname}"',
            "",
            rf"[HKEY_LOCAL_MACHINE\SYSTEM\{s}\Services\Tcpip\Parameters]",
            f'"Hostname"="{spec.hostname.lower()}"',
            "",
            rf"[HKEY_LOCAL_MACHINE\SYSTEM\{s}\Services\atapi]",
            '"Start"=dword:00000003',
            '"Type"=dword:00000001',
            "",
        ]
        for svc, start in _storage_services(spec):
            lines += [rf"[HKEY_LOCAL_MACHINE\SYSTEM\{s}\Services\{svc}]", f'"Start"=dword:{start:08x}',
                      '"Type"=dword:00000001', ""]
            if svc == "storahci":
                lines += [rf"[HKEY_LOCAL_MACHINE\SYSTEM\{s}\Services\{svc}\StartOverride]",
                          '"0"=dword:00000003', ""]
    lines += list(spec.system_reg_extra)
    return _reg(lines)


def software_reg(spec: DiskSpec) -> str:
    major, minor = _version(spec)
    numbers = [f'"CurrentMajorVersionNumber"=dword:{major:08x}',
               f'"CurrentMinorVersionNumber"=dword:{minor:08x}'] if major >= 10 else []
    return _reg([
        r"[HKEY_LOCAL_MACHINE\SOFTWARE\Microsoft\Windows NT\CurrentVersion]",
        f'"ProductName"="{spec.product}"',
        f'"CurrentVersion"="{"6.3" if major >= 10 else spec.version}"',
        *numbers,
        f'"CurrentBuildNumber"="{spec.build}"',
        r'"SystemRoot"="C:\\WINDOWS"',
        "",
        *spec.software_reg_extra,
    ])


def mounted_devices_reg(signature: int, offset: int) -> str:
    """``MountedDevices`` with ``\\DosDevices\\C:`` = disk signature + partition byte offset (12 bytes)."""
    data = signature.to_bytes(4, "little") + offset.to_bytes(8, "little")
    return _reg([r"[HKEY_LOCAL_MACHINE\SYSTEM\MountedDevices]",
                 '"\\\\DosDevices\\\\C:"=hex:' + ",".join(f"{b:02x}" for b in data)])


def build_raw(raw: Path, spec: DiskSpec, *, force_tcg: bool) -> None:
    """Build the raw disk at ``raw`` (overwritten) in one appliance launch."""
    with tempfile.TemporaryDirectory(prefix="gho2kvm-fakedisk-") as td:
        tmp = Path(td)
        with open(raw, "wb") as fh:
            fh.truncate(spec.size_mib * 1024 * 1024)
        if spec.windows:
            for name, text, prefix in (("SYSTEM", system_reg(spec), r"HKEY_LOCAL_MACHINE\SYSTEM"),
                                       ("SOFTWARE", software_reg(spec), r"HKEY_LOCAL_MACHINE\SOFTWARE")):
                hive.write_empty_hive(tmp / name)
                hive.apply_reg(tmp / name, text, prefix, step=STEP)
            (tmp / "driver.sys").write_bytes(b"MZ fake driver for tests\n")
            (tmp / "bootmgfw.efi").write_bytes(pe_file("x86_64").read_bytes())
        with Guestfish([(raw, "raw", False)], image_id=None, step=STEP, force_tcg=force_tcg) as g:
            if spec.partition_table == "gpt":
                g("part-init", "/dev/sda", "gpt")
                if spec.uefi:
                    g("part-add", "/dev/sda", "p", "2048", str(2048 + 40 * 2048 - 1))
                    g("part-set-gpt-type", "/dev/sda", "1", ESP_GUID)
                    g("part-add", "/dev/sda", "p", str(2048 + 40 * 2048), "-34")
                    g("mkfs", "vfat", "/dev/sda1")
                    g("mount", "/dev/sda1", "/")
                    g("mkdir-p", "/EFI/Microsoft/Boot")
                    g("upload", str(tmp / "bootmgfw.efi"), "/EFI/Microsoft/Boot/bootmgfw.efi")
                    g("umount-all")
                    data = "/dev/sda2"
                else:
                    g("part-disk", "/dev/sda", "gpt")
                    data = "/dev/sda1"
            else:
                g("part-disk", "/dev/sda", "mbr")
                g("part-set-bootable", "/dev/sda", "1", "true")
                data = "/dev/sda1"
                if spec.windows and spec.mounted_c_signature is not None:
                    start = int(re.findall(r"part_start:\s*(\d+)", g("part-list", "/dev/sda"))[0])
                    hive.apply_reg(tmp / "SYSTEM", mounted_devices_reg(spec.mounted_c_signature, start),
                                   r"HKEY_LOCAL_MACHINE\SYSTEM", step=STEP)
            g("mkfs", "ntfs", data)
            g("mount", data, "/")
            if spec.windows:
                g("mkdir-p", "/WINDOWS/system32/config")
                g("mkdir-p", "/WINDOWS/system32/drivers")
                g("upload", str(pe_file(spec.arch)), "/WINDOWS/system32/cmd.exe")
                g("upload", str(tmp / "SYSTEM"), "/WINDOWS/system32/config/system")
                g("upload", str(tmp / "SOFTWARE"), "/WINDOWS/system32/config/software")
                for drv in driver_files(spec):
                    g("upload", str(tmp / "driver.sys"), f"/WINDOWS/system32/drivers/{drv}")
                for name, path in spec.config_files:
                    g("upload", str(path), f"/WINDOWS/system32/config/{name}")
            else:
                g("mkdir-p", "/data")
                g("write", "/data/readme.txt", "not an operating system\n")
            g("umount-all")
            g("sync")


def build(out: Path, spec: DiskSpec, *, force_tcg: bool = False, raw_cache: Path | None = None) -> Path:
    """Build ``out`` for ``spec`` unless an identical one is already there; return ``out``.

    ``raw_cache`` is a raw disk made earlier from the same spec (minus ``output``) to convert from,
    so that every VMDK subformat of one disk costs a single appliance launch.
    """
    out = Path(out)
    stamp = out.with_name(out.name + ".spec.json")
    if out.exists() and atomic.read_json(stamp) == spec.stamp():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic.remove_stale_temps(out.parent, out.name)
    if spec.output == "raw":
        with atomic.temporary_path(out) as tmp:
            build_raw(tmp, spec, force_tcg=force_tcg)
    else:
        raw = raw_cache
        tmpdir = None
        if raw is None:
            tmpdir = tempfile.TemporaryDirectory(prefix="gho2kvm-fakedisk-", dir=out.parent)
            raw = Path(tmpdir.name) / "disk.raw"
            build_raw(raw, spec, force_tcg=force_tcg)
        try:
            if spec.output == "qcow2":
                argv = ["qemu-img", "convert", "-f", "raw", "-O", "qcow2"]
            else:
                argv = ["qemu-img", "convert", "-f", "raw", "-O", "vmdk", "-o", f"subformat={spec.output}"]
            # VMDK descriptors name their extents after the output file, so convert in place and
            # only then write the stamp (the stamp is what marks the disk complete).
            # only this disk's own extent files (NAME-flat.vmdk, NAME-s001.vmdk, NAME-f001.vmdk); other
            # disks and other processes' temp files in the same folder are left alone
            extent_re = re.compile(re.escape(out.stem) + r"-(flat|[sf]\d{3})\.vmdk")
            for extra in out.parent.glob(out.stem + "-*.vmdk"):
                if extent_re.fullmatch(extra.name):
                    extra.unlink()
            stamp.unlink(missing_ok=True)
            run([*argv, str(raw), str(out)], step=STEP, timeout=600)
        finally:
            if tmpdir is not None:
                tmpdir.cleanup()
    atomic.write_json(stamp, spec.stamp())
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pipeline.app.fakedisk", description=__doc__.split("\n\n")[0])
    p.add_argument("out", type=Path)
    p.add_argument("--product", default=XP.product)
    p.add_argument("--version", default=XP.version)
    p.add_argument("--build", default=XP.build)
    p.add_argument("--control-set", type=int, default=1)
    p.add_argument("--hostname", default=XP.hostname)
    p.add_argument("--gpt", action="store_true")
    p.add_argument("--uefi", action="store_true")
    p.add_argument("--size-mib", type=int, default=64)
    p.add_argument("--arch", default="i386", choices=("i386", "x86_64"))
    p.add_argument("--output", default=None, help="raw | qcow2 | " + " | ".join(VMDK_SUBFORMATS) +
                   " (default from the file name)")
    p.add_argument("--force-tcg", action="store_true", default=None,
                   help="libguestfs without KVM (default: $GHO2KVM_FORCE_TCG)")
    a = p.parse_args(argv)
    output = a.output or {".vmdk": "monolithicSparse", ".qcow2": "qcow2"}.get(a.out.suffix, "raw")
    spec = DiskSpec(product=a.product, version=a.version, build=a.build, control_set=a.control_set,
                    hostname=a.hostname, partition_table="gpt" if a.gpt or a.uefi else "mbr", uefi=a.uefi,
                    size_mib=a.size_mib, arch=a.arch, output=output)
    build(a.out, spec, force_tcg=resolve(flags={"force_tcg": a.force_tcg}).force_tcg)
    print(a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())


def virtio_tree(folder: Path, entries: list[tuple[str, str, str]]) -> Path:
    """A stand-in virtio-win tree: ``<driver>/<os>/<arch>/<driver>.sys`` (+ ``.inf``) for each
    ``(driver, os, arch)``; the ``.sys`` files are real PE files (the real drivers are in no Debian
    package). Returns ``folder``."""
    for driver, os_dir, arch in entries:
        d = folder / driver / os_dir / arch
        d.mkdir(parents=True, exist_ok=True)
        (d / f"{driver}.sys").write_bytes(pe_file("x86_64" if arch == "amd64" else "i386").read_bytes())
        (d / f"{driver}.inf").write_text(f"; stand-in for {driver}.inf ({os_dir}/{arch})\r\n")
    return folder


def iso_of(folder: Path, iso: Path) -> Path:
    """An ISO 9660 image (Joliet + Rock Ridge, names kept) of ``folder``, like virtio-win's ISO."""
    run(["genisoimage", "-quiet", "-J", "-R", "-V", "virtio-win", "-o", str(iso), str(folder)], step=STEP,
        timeout=120)
    return iso
