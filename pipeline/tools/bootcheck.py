"""The boot check: start a defined domain on throwaway overlays of its disks, watch its screen, stop it.

libvirt is driven through :mod:`pipeline.tools.virt` (connection, start, state, destroy); this module
captures the screen (the screenshot stream, decoded and saved with Pillow, and the VGA text buffer)
and hands both to :mod:`pipeline.tools.screen`, the pure classifier.
"""

from __future__ import annotations

import contextlib
import io
import os
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import libvirt
from PIL import Image

from pipeline.core import atomic
from pipeline.core.choices import Step
from pipeline.tools import ocr, qemu_img, screen, virt
from pipeline.tools.virt import BootCheckError

# ---------------------------------------------------------------------------------------------
# screen capture


def _grab(conn: libvirt.virConnect, dom: libvirt.virDomain) -> bytes:
    """The screenshot as libvirt delivers it (PNG or PPM, depending on QEMU)."""
    stream = conn.newStream(0)
    chunks: list[bytes] = []
    try:
        dom.screenshot(stream, 0)

        def sink(_st: libvirt.virStream, buf: bytes, _opaque: object) -> int:
            chunks.append(bytes(buf))
            return len(buf)

        stream.recvAll(sink, None)
        stream.finish()
    except BaseException:
        with contextlib.suppress(libvirt.libvirtError):
            stream.abort()
        raise
    return b"".join(chunks)


def _decode(data: bytes, name: str, image_id: str | None) -> Image.Image:
    try:
        img = Image.open(io.BytesIO(data))
        img.load()
    except (OSError, ValueError, SyntaxError) as e:
        raise BootCheckError(f"screenshot of {name} ({len(data)} bytes) is unreadable: {e}",
                             image_id=image_id, step=Step.DEFINE) from None
    return img


def _text_buffer(dom: libvirt.virDomain) -> bytes | None:
    """The VGA text buffer (physical 0xB8000), None where the driver cannot read guest memory."""
    try:
        return bytes(dom.memoryPeek(0xB8000, screen.TEXT_BYTES, libvirt.VIR_MEMORY_PHYSICAL))
    except libvirt.libvirtError:
        return None


def _save_png(img: Image.Image, path: Path) -> None:
    with atomic.temporary_path(path) as tmp:
        img.save(tmp, format="PNG")


# ---------------------------------------------------------------------------------------------
# the check


def _throwaway_xml(xml: str, scratch: Path, image_id: str | None) -> tuple[str, list[Path]]:
    """The domain's XML with every file-backed disk replaced by a new qcow2 overlay in ``scratch``
    (backed by the disk, which the guest then never writes): the boot check leaves the final disk
    and the receipts that stamp it untouched. Returns (xml, overlays to delete afterwards)."""
    root = ET.fromstring(xml)
    overlays: list[Path] = []
    for i, disk in enumerate(root.findall("./devices/disk")):
        source = disk.find("source")
        if disk.get("device", "disk") != "disk" or disk.get("type", "file") != "file" or source is None \
                or not source.get("file"):
            continue
        driver = disk.find("driver")
        if driver is None:
            driver = ET.SubElement(disk, "driver", {"name": "qemu"})
        backing = Path(str(source.get("file")))
        if not backing.is_file():
            raise BootCheckError(f"boot check: domain '{root.findtext('name')}' failed to start: its disk "
                                 f"{backing} does not exist", image_id=image_id, step=Step.DEFINE)
        overlay = atomic.temp_name(scratch / f"boot-check-{i}.qcow2")
        qemu_img.create_overlay(overlay, backing, driver.get("type", "raw"), image_id=image_id,
                                step=Step.DEFINE)
        overlays.append(overlay)
        overlay.chmod(0o644)
        source.set("file", str(overlay.absolute()))
        driver.set("type", "qcow2")
        for chain in disk.findall("backingStore"):
            disk.remove(chain)
    return ET.tostring(root, encoding="unicode"), overlays


def boot_check(uri: str, name: str, seconds: float, screenshot_path: str | os.PathLike[str],
               keep_running: bool = False, *, expect: str = "any", image_id: str | None = None,
               poll: float = 1.0, settle: dict[str, float | None] | None = None) -> dict[str, Any]:
    """Start domain ``name``, watch its screen until the verdict is stable or ``seconds`` ran out.

    The guest runs on throwaway overlays of its disks (:func:`_throwaway_xml`; libvirt starts the
    persistent domain with that live definition, its stored one unchanged), so a check never
    changes the final disk; with ``keep_running`` a passed check then starts the domain for real.
    Each look reads the VGA text buffer and a screenshot and hands both to
    :func:`pipeline.tools.screen.classify`; :class:`pipeline.tools.screen.Watch` decides when a verdict is
    stable. A graphics-mode stop screen's code is read with tesseract when it is installed.
    The last screenshot goes to ``screenshot_path`` (PNG). The domain is destroyed
    afterwards unless ``keep_running`` and the check passed. Returns the JSON-able verdict
    (``verdict``, ``stop_code``, ``stop_name``, ``text``, ``screenshot``, ``seconds_to_verdict``,
    ...); a failing verdict (or one other than ``expect``) raises :class:`BootCheckError` with the
    same dict as ``details``.
    """
    step = Step.DEFINE
    shot = Path(screenshot_path)
    scratch = shot.parent
    scratch.mkdir(parents=True, exist_ok=True)
    atomic.remove_stale_temps(scratch, "boot-check-")
    virt.ensure_event_loop()  # before the connection: it delivers the reboot event
    with virt.connect(uri, step=step, image_id=image_id) as conn:
        dom = virt.startable(conn, uri, name, image_id)
        overlays: list[Path] = []
        ok = False
        rebooted: list[float] = []  # seconds after start of each reset (libvirt's reboot event)
        events: int | None = None
        try:
            xml, overlays = _throwaway_xml(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE), scratch, image_id)
            t0 = time.monotonic()
            dom = virt.start_checked(lambda: conn.createXML(xml, 0), uri, name, image_id)
            events = virt.on_reboot(conn, dom, lambda: rebooted.append(time.monotonic() - t0))
            watch = screen.Watch(settle)
            obs: screen.Observation | None = None
            img: Image.Image | None = None
            desc = "running"
            t = 0.0
            while True:
                desc, alive = virt.describe_state(dom)
                t = time.monotonic() - t0
                if not alive:
                    obs = screen.Observation("crashed", watch.last.mode if watch.last else "none",
                                             watch.last.text if watch.last else "",
                                             message=desc,
                                             hint=virt.qemu_log_tail(uri, name).removeprefix(" | "))
                    break
                if rebooted:  # the guest reset itself: what it showed last is the screen to report
                    last = watch.last or screen.Observation("booting", "none")
                    obs = screen.Observation("rebooted", last.mode, last.text, last.stop_code, last.stop_name,
                                             message=f"the guest restarted itself after {rebooted[0]:.1f} s",
                                             hint=screen.reboot_hint(watch.last))
                    t = rebooted[0]
                    break
                buf = _text_buffer(dom)
                try:
                    img = _decode(_grab(conn, dom), name, image_id)
                except libvirt.libvirtError:
                    if not virt.describe_state(dom)[1]:
                        continue  # it stopped meanwhile: reported as crashed above
                    raise
                obs = watch.add(t, screen.classify(buf, img))
                if obs is not None:
                    break
                if t >= seconds:
                    obs = watch.final()
                    break
                time.sleep(max(0.0, min(poll, seconds - t)))
            if obs.verdict == "bsod" and obs.mode == "graphics" and img is not None:
                obs = screen.with_ocr(obs, ocr.read_text(img, image_id=image_id))
            result: dict[str, Any] = {"name": name, "uri": uri, "uuid": dom.UUIDString(), "seconds": seconds,
                                      "expect": expect, **obs.to_dict(),
                                      "seconds_to_verdict": round(t, 1), "state": desc,
                                      "first_seen": {k: round(v, 1) for k, v in watch.first_seen.items()},
                                      "screenshot": None}
            if img is not None:
                _save_png(img, shot)
                result.update({"screenshot": str(shot), "width": img.width, "height": img.height})
            failure = screen.failure_message(result, expect)
            result["ok"] = failure is None
            result["kept_running"] = keep_running and failure is None
            if failure is not None:
                raise BootCheckError(failure, image_id=image_id, step=step, details=result)
            ok = True
        except libvirt.libvirtError as e:
            raise virt.translate(e, uri=uri, doing=f"boot-checking domain '{name}'", step=step,
                            image_id=image_id) from None
        finally:
            if events is not None:
                virt.stop_events(conn, events)
            with contextlib.suppress(libvirt.libvirtError):
                d = conn.lookupByName(name)
                if d.isActive():
                    d.destroy()
            for overlay in overlays:
                overlay.unlink(missing_ok=True)
    if ok and keep_running:
        virt.start_domain(uri, name, image_id=image_id)
    return result
