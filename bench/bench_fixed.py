"""Fixed costs per image (issue 23): capabilities per URI, and where the boot check's time goes.

    GHO2KVM_FORCE_TCG=1 .venv/bin/python -m bench.bench_fixed [--boot | --no-boot]

1. host + domain capabilities: one live read of ``test:///default`` (and of ``qemu:///system`` when a
   libvirtd answers) against the same read replayed inside ``virt.caps_once_per_run`` (what every
   image after the first pays in one run);
2. ``--boot`` (the default as root with nasm; starts libvirtd + virtlogd when none answers and stops
   what it started): a boot sector that prints a text-mode stop screen, split into ``define``,
   ``createXML`` (libvirt + QEMU start), first non-blank VGA text (the text buffer polled every
   0.05 s, no screenshots), one screenshot's cost and ``boot_check``'s own time to its verdict; then
   the DOS fixture 75_none (rebuilt by the native reader) to its prompt.
The no-op re-run of 20 images is ``bench/bench_noop.py``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import emit, load_note, row

STOP_ASM = """bits 16
org 0x7C00
  mov ax, 0x0003
  int 0x10
  mov ax, 0xB800
  mov es, ax
  xor di, di
  mov si, msg
  mov ah, 0x1F
next:
  lodsb
  test al, al
  jz done
  stosw
  jmp next
done:
  cli
  hlt
  jmp done
msg: db "A problem has been detected and Windows has been shut down to prevent damage to your computer. "
     db "STOP: 0x0000007B (0xF78D2524,0xC0000034,0x00000000,0x00000000) INACCESSIBLE_BOOT_DEVICE", 0
times 510-($-$$) db 0
dw 0xAA55
"""


def caps_costs(uri: str) -> tuple[float, float]:
    from pipeline.tools import virt

    t0 = time.monotonic()
    virt.host_caps_for_uri(uri, prefer_kvm=False)
    live = time.monotonic() - t0
    with virt.caps_once_per_run():
        virt.host_caps_for_uri(uri, prefer_kvm=False)
        t0 = time.monotonic()
        for _ in range(10):
            virt.host_caps_for_uri(uri, prefer_kvm=False)
        replay = (time.monotonic() - t0) / 10
    return live, replay


def boot_split(uri: str, folder: Path) -> dict[str, Any]:
    import libvirt

    from pipeline.domain import DomainSpec, build_domain, render
    from pipeline.tools import bootcheck, screen, virt

    asm = folder / "stop.asm"
    asm.write_text(STOP_ASM)
    disk = folder / "stop.raw"
    subprocess.run(["nasm", "-f", "bin", "-o", str(disk), str(asm)], check=True)
    with open(disk, "r+b") as f:
        f.truncate(1 << 20)
    host = virt.host_caps_for_uri(uri, prefer_kvm=False)
    name = "gho2kvm-bench-fixed"
    spec = DomainSpec(name=name, image_id=name, disk_path=str(disk), memory_mib=64, os_major=5, os_minor=1)
    out: dict[str, Any] = {}
    t0 = time.monotonic()
    virt.define(uri, render(build_domain(spec, host)))
    out["define"] = time.monotonic() - t0
    try:
        with virt.connect(uri, step="bench") as conn:
            dom = conn.lookupByName(name)
            t0 = time.monotonic()
            dom.create()
            out["create"] = time.monotonic() - t0
            t1 = time.monotonic()
            first = None
            while time.monotonic() - t1 < 120:
                buf = bytes(dom.memoryPeek(0xB8000, screen.TEXT_BYTES, libvirt.VIR_MEMORY_PHYSICAL))
                text = buf[0::2].decode("cp437")
                if text.strip(" \0") and first is None:
                    first = (time.monotonic() - t1, text.strip()[:60])
                if "STOP" in text:
                    out["stop_text"] = time.monotonic() - t1
                    break
                time.sleep(0.05)
            out["first_text"] = first
            shots = []
            for _ in range(5):
                t = time.monotonic()
                bootcheck._grab(conn, dom)  # noqa: SLF001 - the check's own screenshot path
                shots.append(time.monotonic() - t)
            out["screenshot"] = statistics.median(shots)
            dom.destroy()
        out["check"] = timed_check(uri, name, folder)
    finally:
        virt.undefine(uri, name)
    # a DOS 7.1 guest: the real Ghost fixture, rebuilt by the native reader
    from pipeline.gho import extract

    dos = folder / "dos.raw"
    extract(Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "gho" / "75_none.gho", dos)
    spec = DomainSpec(name=name, image_id=name, disk_path=str(dos), memory_mib=64)
    virt.define(uri, render(build_domain(spec, host)))
    try:
        out["dos"] = timed_check(uri, name, folder)
    finally:
        virt.undefine(uri, name)
    return out


def timed_check(uri: str, name: str, folder: Path) -> dict[str, Any]:
    from pipeline.tools import bootcheck, virt

    t0 = time.monotonic()
    try:
        v = bootcheck.boot_check(uri, name, 120, folder / "shot.png", expect="prompt", image_id=name)
    except virt.BootCheckError as e:
        v = (e.details or {}).get("boot_check", e.details or {})
    return {"wall": time.monotonic() - t0, "to_verdict": v.get("seconds_to_verdict"),
            "verdict": v.get("verdict"), "first_seen": v.get("first_seen")}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--boot", action="store_true", default=None,
                   help="also split a boot check (real libvirtd; the default when root and nasm is there)")
    p.add_argument("--no-boot", dest="boot", action="store_false")
    a = p.parse_args(argv)
    if a.boot is None:
        a.boot = os.geteuid() == 0 and shutil.which("nasm") is not None
    from pipeline.tools import libvirtd

    cmd = "python -m bench.bench_fixed" + (" --boot" if a.boot else "")
    rows = []
    notes = [f"start: {load_note()}"]
    uris = ["test:///default"] + ([libvirtd.SYSTEM_URI] if a.boot or libvirtd.answers() else [])
    started: list[Any] = []
    figures: dict[str, Any] = {}
    try:
        if a.boot and not libvirtd.answers():
            started = libvirtd.ensure(Path(tempfile.mkdtemp(prefix="gho2kvm-bench-libvirtd-")))
        for uri in uris:
            live, replay = caps_costs(uri)
            figures[uri] = {"caps_live": live, "caps_replay": replay}
            rows.append(row(f"capabilities of {uri}: first image / every later one in the run",
                            f"{live * 1000:.0f} ms / {replay * 1000:.1f} ms", "", None, cmd))
        if a.boot:
            with tempfile.TemporaryDirectory(prefix="gho2kvm-bench-boot-", dir="/var/tmp") as td:
                Path(td).chmod(0o755)
                b = boot_split(libvirtd.SYSTEM_URI, Path(td))
            figures["boot"] = b
            ft = b.get("first_text")
            rows.append(row("boot check split (stop-screen sector, TCG)",
                            f"define {b['define']:.2f} s, createXML (libvirt + QEMU start) "
                            f"{b['create']:.2f} s, "
                            f"first text {ft[0] if ft else float('nan'):.2f} s, stop screen "
                            f"{b.get('stop_text', float('nan')):.2f} s after start; one screenshot "
                            f"{b['screenshot'] * 1000:.0f} ms", "", None, cmd))
            checks = (("stop-screen sector", b.get("check", {})), ("DOS fixture 75_none", b.get("dos", {})))
            for what, c in checks:
                rows.append(row(f"boot_check() of the {what}: seconds to verdict",
                                f"{c.get('to_verdict')} s (wall {c.get('wall', 0):.1f} s, verdict "
                                f"{c.get('verdict')}, first seen {c.get('first_seen')})", "≤ 30 s",
                                (c.get("to_verdict") or 999) <= 30, cmd))
    finally:
        for proc in reversed(started):
            libvirtd.stop(proc)
    notes.append(f"end: {load_note()}")
    for r in rows:
        print(f"{r['measure']}: {r['figure']} {r['goal']}")
    print("\n".join(notes))
    emit("fixed", rows, figures=figures, notes=notes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
