"""libvirt operations through libvirt-python: host facts, idempotent define, undefine, boot check.

Every libvirt failure becomes ONE line: an unreachable daemon is a
:class:`~pipeline.errors.TransientError` (retry later), permission problems and XML libvirt refuses
are :class:`~pipeline.errors.InputError`, a guest that does not stay up is a :class:`BootCheckError`.
"""

from __future__ import annotations

import contextlib
import os
import struct
import tempfile
import time
import xml.etree.ElementTree as ET
import zlib
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import libvirt

from pipeline.domain.facts import HostCaps, host_caps
from pipeline.errors import Gho2KvmError, InputError, TransientError


class BootCheckError(Gho2KvmError):
    """The domain did not start, or did not stay running for the boot-check period."""


def _quiet(_ctx: object, _err: object) -> None:
    """libvirt prints every error to stderr by default; we report them ourselves."""


libvirt.registerErrorHandler(_quiet, None)

_UNREACHABLE_HINTS = ("failed to connect", "connection refused", "no such file or directory",
                      "cannot recv data", "cannot write data", "end of file while reading",
                      "broken pipe", "connection reset", "not connected", "keepalive timeout")
_PERMISSION_CODES = {
    libvirt.VIR_ERR_AUTH_FAILED, libvirt.VIR_ERR_AUTH_CANCELLED, libvirt.VIR_ERR_AUTH_UNAVAILABLE,
    libvirt.VIR_ERR_ACCESS_DENIED, libvirt.VIR_ERR_OPERATION_DENIED,
}
_INPUT_CODES = {
    libvirt.VIR_ERR_XML_ERROR, libvirt.VIR_ERR_XML_DETAIL, libvirt.VIR_ERR_XML_INVALID_SCHEMA,
    libvirt.VIR_ERR_CONFIG_UNSUPPORTED, libvirt.VIR_ERR_INVALID_ARG,
    libvirt.VIR_ERR_NO_SUPPORT, libvirt.VIR_ERR_OPERATION_UNSUPPORTED, libvirt.VIR_ERR_INTERNAL_ERROR,
}
_TRANSIENT_CODES = {libvirt.VIR_ERR_OPERATION_TIMEOUT, libvirt.VIR_ERR_RPC}


def _msg(e: libvirt.libvirtError) -> str:
    return " ".join(str(e.get_error_message() or e).split())


def translate(e: libvirt.libvirtError, *, uri: str, doing: str, step: str,
              image_id: str | None = None, connecting: bool = False) -> Gho2KvmError:
    """One clear, typed line for a libvirt error raised while ``doing`` something on ``uri``."""
    code = e.get_error_code()
    msg = _msg(e)
    low = msg.lower()
    if code in _PERMISSION_CODES or "permission denied" in low or "access denied" in low:
        return InputError(f"permission denied by libvirt at {uri} while {doing}: {msg}",
                          image_id=image_id, step=step)
    if code == libvirt.VIR_ERR_NO_CONNECT and "no connection driver" in low:
        return InputError(f"libvirt URI {uri} is not usable here: {msg}", image_id=image_id, step=step)
    # only connection-level errors (not e.g. "Cannot access storage file ...: No such file") count
    transport = connecting or code == libvirt.VIR_ERR_NO_CONNECT or \
        e.get_error_domain() in (libvirt.VIR_FROM_RPC, libvirt.VIR_FROM_REMOTE)
    if transport and any(h in low for h in _UNREACHABLE_HINTS):
        return TransientError(f"libvirt daemon at {uri} is unreachable while {doing}: {msg}",
                              image_id=image_id, step=step)
    if connecting:
        return InputError(f"cannot connect to libvirt at {uri}: {msg}", image_id=image_id, step=step)
    if code in _TRANSIENT_CODES:
        return TransientError(f"libvirt at {uri} failed while {doing}: {msg}", image_id=image_id, step=step)
    if code in _INPUT_CODES:
        return InputError(f"libvirt at {uri} refused {doing}: {msg}", image_id=image_id, step=step)
    return Gho2KvmError(f"libvirt at {uri} failed while {doing}: {msg}", image_id=image_id, step=step)


@contextlib.contextmanager
def connect(uri: str, *, step: str, image_id: str | None = None) -> Iterator[libvirt.virConnect]:
    """An open connection to ``uri`` (closed afterwards); connection failures are translated."""
    try:
        conn = libvirt.open(uri)
    except libvirt.libvirtError as e:
        raise translate(e, uri=uri, doing="connecting", step=step, image_id=image_id,
                        connecting=True) from None
    try:
        yield conn
    finally:
        with contextlib.suppress(libvirt.libvirtError):
            conn.close()


def _lookup(conn: libvirt.virConnect, *, name: str | None = None,
            uuid: str | None = None) -> libvirt.virDomain | None:
    try:
        if name is not None:
            return conn.lookupByName(name)
        assert uuid is not None
        return conn.lookupByUUIDString(uuid)
    except libvirt.libvirtError as e:
        if e.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
            return None
        raise


# ---------------------------------------------------------------------------------------------
# host facts


def host_caps_for_uri(uri: str, *, prefer_kvm: bool | None = None, image_id: str | None = None) -> HostCaps:
    """:func:`pipeline.domain.facts.host_caps` for the libvirt host at ``uri``."""
    with connect(uri, step="host-caps", image_id=image_id) as conn:
        try:
            return host_caps(conn, prefer_kvm=prefer_kvm)
        except libvirt.libvirtError as e:
            raise translate(e, uri=uri, doing="reading capabilities", step="host-caps",
                            image_id=image_id) from None


# ---------------------------------------------------------------------------------------------
# define


@dataclass(frozen=True)
class DefineResult:
    action: str  # created | updated | unchanged
    name: str
    uuid: str
    uri: str
    autostart: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def canonical_xml(xml: str) -> str:
    """C14N of a domain XML with insignificant whitespace removed, for equality checks."""
    return ET.canonicalize(xml_data=xml, strip_text=True)


def define(uri: str, xml: str, *, autostart: bool = False, image_id: str | None = None) -> DefineResult:
    """Define (create or update) the persistent domain described by ``xml`` on ``uri``. Idempotent.

    The XML must carry ``<name>`` and ``<uuid>``. A domain with the same name but another UUID, or
    the same UUID under another name, belongs to someone else: refused, never overwritten.
    Otherwise the XML is defined with ``VIR_DOMAIN_DEFINE_VALIDATE`` and the action is decided by
    comparing libvirt's own inactive XML of the domain before and after (both formatted by libvirt,
    so defaults it fills in, addresses it assigns and our formatting cannot cause false changes):
    ``created``, ``updated`` (XML or autostart changed) or ``unchanged``. Redefining identical XML
    is a no-op for libvirt, so the "define then compare" costs nothing when nothing changed.
    """
    step = "define"
    try:
        root = ET.fromstring(xml)
    except ET.ParseError as e:
        raise InputError(f"domain XML is not well-formed: {e}", image_id=image_id, step=step) from None
    name = (root.findtext("name") or "").strip()
    want_uuid = (root.findtext("uuid") or "").strip().lower()
    if not name or not want_uuid:
        raise InputError("domain XML needs both <name> and <uuid> to be defined idempotently",
                         image_id=image_id, step=step)
    with connect(uri, step=step, image_id=image_id) as conn:
        try:
            old = _lookup(conn, name=name)
            if old is not None and old.UUIDString().lower() != want_uuid:
                raise InputError(
                    f"a domain named '{name}' already exists on {uri} with UUID {old.UUIDString()} "
                    f"(ours is {want_uuid}); refusing to overwrite another VM: choose another name or "
                    f"undefine it first", image_id=image_id, step=step)
            if old is None:
                other = _lookup(conn, uuid=want_uuid)
                if other is not None:
                    raise InputError(
                        f"UUID {want_uuid} is already used on {uri} by domain '{other.name()}' "
                        f"(we want name '{name}'); refusing to rename another VM",
                        image_id=image_id, step=step)
            old_xml = old.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE) if old is not None else None
            old_autostart = bool(old.autostart()) if old is not None and old.isPersistent() else False
            dom = conn.defineXMLFlags(xml, libvirt.VIR_DOMAIN_DEFINE_VALIDATE)
            new_xml = dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)
            if bool(dom.autostart()) != autostart:
                dom.setAutostart(1 if autostart else 0)
        except libvirt.libvirtError as e:
            raise translate(e, uri=uri, doing=f"defining domain '{name}'", step=step,
                            image_id=image_id) from None
    if old_xml is None:
        action = "created"
    elif canonical_xml(old_xml) != canonical_xml(new_xml) or old_autostart != autostart:
        action = "updated"
    else:
        action = "unchanged"
    return DefineResult(action=action, name=name, uuid=want_uuid, uri=uri, autostart=autostart)


def undefine(uri: str, name: str, *, image_id: str | None = None) -> bool:
    """Stop (if running) and undefine domain ``name``, with its NVRAM and managed save.

    Returns False when there was no such domain (idempotent).
    """
    step = "undefine"
    with connect(uri, step=step, image_id=image_id) as conn:
        try:
            dom = _lookup(conn, name=name)
            if dom is None:
                return False
            if dom.isActive():
                dom.destroy()
            if dom.isPersistent():
                flags = (libvirt.VIR_DOMAIN_UNDEFINE_NVRAM | libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE
                         | libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA)
                try:
                    dom.undefineFlags(flags)
                except libvirt.libvirtError as e:
                    if e.get_error_code() not in (libvirt.VIR_ERR_NO_SUPPORT, libvirt.VIR_ERR_INVALID_ARG):
                        raise
                    dom.undefine()
        except libvirt.libvirtError as e:
            raise translate(e, uri=uri, doing=f"undefining domain '{name}'", step=step,
                            image_id=image_id) from None
    return True


# ---------------------------------------------------------------------------------------------
# boot check

_STATE_NAMES = {
    libvirt.VIR_DOMAIN_NOSTATE: "nostate", libvirt.VIR_DOMAIN_RUNNING: "running",
    libvirt.VIR_DOMAIN_BLOCKED: "blocked", libvirt.VIR_DOMAIN_PAUSED: "paused",
    libvirt.VIR_DOMAIN_SHUTDOWN: "shutting down", libvirt.VIR_DOMAIN_SHUTOFF: "shut off",
    libvirt.VIR_DOMAIN_CRASHED: "crashed", libvirt.VIR_DOMAIN_PMSUSPENDED: "pmsuspended",
}
_SHUTOFF_REASONS = {
    libvirt.VIR_DOMAIN_SHUTOFF_SHUTDOWN: "guest shut down", libvirt.VIR_DOMAIN_SHUTOFF_DESTROYED: "destroyed",
    libvirt.VIR_DOMAIN_SHUTOFF_CRASHED: "crashed", libvirt.VIR_DOMAIN_SHUTOFF_FAILED: "failed to start",
}
_PAUSED_REASONS = {libvirt.VIR_DOMAIN_PAUSED_IOERROR: "disk I/O error",
                   libvirt.VIR_DOMAIN_PAUSED_CRASHED: "guest crashed (panic)"}


def _describe_state(dom: libvirt.virDomain) -> tuple[str, bool]:
    """(human description, still-alive?) for the domain's current state."""
    state, reason = dom.state()
    name = _STATE_NAMES.get(state, str(state))
    if state == libvirt.VIR_DOMAIN_SHUTOFF:
        return f"{name} ({_SHUTOFF_REASONS.get(reason, f'reason {reason}')})", False
    if state == libvirt.VIR_DOMAIN_CRASHED:
        return name, False
    if state == libvirt.VIR_DOMAIN_PAUSED and reason in _PAUSED_REASONS:
        return f"{name} ({_PAUSED_REASONS[reason]})", False
    return name, state in (libvirt.VIR_DOMAIN_RUNNING, libvirt.VIR_DOMAIN_BLOCKED)


def _qemu_log_tail(uri: str, name: str) -> str:
    if not uri.startswith("qemu:///"):
        return ""
    path = Path("/var/log/libvirt/qemu") / f"{name}.log"
    try:
        lines = [ln.strip() for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    return (" | qemu log: " + " | ".join(lines[-2:])[:400]) if lines else ""


def _read_ppm(data: bytes) -> tuple[int, int, int, bytes]:
    """(width, height, maxval, pixels) of a binary P6 PPM."""
    fields: list[bytes] = []
    pos = 0
    while len(fields) < 4:
        while pos < len(data) and data[pos:pos + 1].isspace():
            pos += 1
        if data[pos:pos + 1] == b"#":
            pos = data.index(b"\n", pos) + 1
            continue
        start = pos
        while pos < len(data) and not data[pos:pos + 1].isspace():
            pos += 1
        fields.append(data[start:pos])
    if fields[0] != b"P6":
        raise ValueError(f"not a binary PPM (magic {fields[0]!r})")
    width, height, maxval = (int(f) for f in fields[1:4])
    pos += 1  # the single whitespace byte after maxval
    return width, height, maxval, data[pos:pos + width * height * 3]


def ppm_to_png(data: bytes) -> tuple[bytes, int, int]:
    """Encode a P6 PPM (8-bit) as PNG with only the standard library; returns (png, width, height)."""
    width, height, maxval, pixels = _read_ppm(data)
    if maxval != 255:
        raise ValueError(f"unsupported PPM maxval {maxval}")
    stride = width * 3
    raw = b"".join(b"\x00" + pixels[y * stride:(y + 1) * stride] for y in range(height))

    def chunk(tag: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + tag + body + struct.pack(">I", zlib.crc32(tag + body))

    png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
           + chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b""))
    return png, width, height


def _png_chunks(data: bytes) -> Iterator[tuple[bytes, bytes]]:
    if not data.startswith(b"\x89PNG\r\n\x1a\n"):
        raise ValueError("not a PNG")
    pos = 8
    while pos + 8 <= len(data):
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        tag = data[pos + 4:pos + 8]
        yield tag, data[pos + 8:pos + 8 + length]
        pos += 12 + length
        if tag == b"IEND":
            return


def png_size(data: bytes) -> tuple[int, int]:
    for tag, body in _png_chunks(data):
        if tag == b"IHDR":
            width, height = struct.unpack(">II", body[:8])
            return width, height
    raise ValueError("PNG without IHDR")


def png_to_ppm(data: bytes) -> tuple[bytes, int, int]:
    """Decode an 8-bit, non-interlaced gray/RGB/RGBA PNG (what QEMU and libvirt produce) to a P6 PPM."""
    ihdr = b""
    idat = []
    for tag, body in _png_chunks(data):
        if tag == b"IHDR":
            ihdr = body
        elif tag == b"IDAT":
            idat.append(body)
    width, height, depth, ctype, _, _, interlace = struct.unpack(">IIBBBBB", ihdr[:13])
    channels = {0: 1, 2: 3, 4: 2, 6: 4}.get(ctype)
    if depth != 8 or channels is None or interlace:
        raise ValueError(f"unsupported PNG (depth {depth}, colour type {ctype}, interlace {interlace})")
    raw = zlib.decompress(b"".join(idat))
    bpp, stride = channels, width * channels
    prev = bytearray(stride)
    out = bytearray()
    pos = 0
    for _ in range(height):
        ftype = raw[pos]
        line = bytearray(raw[pos + 1:pos + 1 + stride])
        pos += 1 + stride
        if ftype == 1:
            for i in range(bpp, stride):
                line[i] = (line[i] + line[i - bpp]) & 0xFF
        elif ftype == 2:
            line = bytearray((a + b) & 0xFF for a, b in zip(line, prev, strict=True))
        elif ftype == 3:
            for i in range(stride):
                left = line[i - bpp] if i >= bpp else 0
                line[i] = (line[i] + ((left + prev[i]) >> 1)) & 0xFF
        elif ftype == 4:
            for i in range(stride):
                a = line[i - bpp] if i >= bpp else 0
                b = prev[i]
                c = prev[i - bpp] if i >= bpp else 0
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                pred = a if pa <= pb and pa <= pc else (b if pb <= pc else c)
                line[i] = (line[i] + pred) & 0xFF
        elif ftype != 0:
            raise ValueError(f"bad PNG filter {ftype}")
        prev = line
        if channels == 3:
            out += line
        else:
            for x in range(width):
                px = line[x * channels:(x + 1) * channels]
                out += bytes(px[:3]) if channels == 4 else bytes([px[0]] * 3)
    return b"P6\n%d %d\n255\n" % (width, height) + bytes(out), width, height


def _screenshot(conn: libvirt.virConnect, dom: libvirt.virDomain, path: Path,
                image_id: str | None) -> dict[str, Any]:
    stream = conn.newStream(0)
    chunks: list[bytes] = []
    try:
        mime = dom.screenshot(stream, 0) or ""

        def sink(_st: libvirt.virStream, buf: bytes, _opaque: object) -> int:
            chunks.append(bytes(buf))
            return len(buf)

        stream.recvAll(sink, None)
        stream.finish()
    except BaseException:
        with contextlib.suppress(libvirt.libvirtError):
            stream.abort()
        raise
    data = b"".join(chunks)
    want_png = path.suffix.lower() == ".png"
    try:
        if data.startswith(b"\x89PNG"):  # newer QEMU: PNG
            width, height = png_size(data)
            out = data if want_png else png_to_ppm(data)[0]
        else:  # older QEMU: image/x-portable-pixmap
            width, height, _, _ = _read_ppm(data)
            out = ppm_to_png(data)[0] if want_png else data
    except (ValueError, IndexError, struct.error, zlib.error) as e:
        raise BootCheckError(f"screenshot of {dom.name()} ({mime}, {len(data)} bytes) is unreadable: {e}",
                             image_id=image_id, step="boot-check") from None
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(out)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return {"screenshot": str(path), "mime": "image/png" if want_png else "image/x-portable-pixmap",
            "source_mime": mime, "width": width, "height": height, "bytes": len(out)}


def boot_check(uri: str, name: str, seconds: float, screenshot_path: str | os.PathLike[str],
               keep_running: bool = False, *, image_id: str | None = None,
               poll: float = 0.5) -> dict[str, Any]:
    """Start domain ``name``, check it is still running after ``seconds``, take a screenshot.

    The screenshot goes to ``screenshot_path`` (``.png`` converted here, anything else written as
    libvirt delivers it, PPM for QEMU). The domain is destroyed afterwards unless ``keep_running``
    (also when the check fails). Returns a JSON-able dict for the task's output.
    """
    step = "boot-check"
    shot = Path(screenshot_path)
    with connect(uri, step=step, image_id=image_id) as conn:
        started = False
        ok = False
        try:
            dom = _lookup(conn, name=name)
            if dom is None:
                raise InputError(f"no domain named '{name}' on {uri}", image_id=image_id, step=step)
            if dom.isActive():
                raise InputError(f"domain '{name}' on {uri} is already running; shut it down before a "
                                 f"boot check", image_id=image_id, step=step)
            t0 = time.monotonic()
            try:
                dom.create()
            except libvirt.libvirtError as e:
                err = translate(e, uri=uri, doing=f"starting domain '{name}'", step=step, image_id=image_id)
                if isinstance(err, TransientError):
                    raise err from None
                raise BootCheckError(f"domain '{name}' on {uri} failed to start: {_msg(e)}",
                                     image_id=image_id, step=step) from None
            started = True
            deadline = t0 + seconds
            while True:
                desc, alive = _describe_state(dom)
                if not alive:
                    raise BootCheckError(
                        f"domain '{name}' on {uri} did not stay running: {desc} after "
                        f"{time.monotonic() - t0:.1f}s{_qemu_log_tail(uri, name)}",
                        image_id=image_id, step=step)
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                time.sleep(min(poll, remaining))
            result: dict[str, Any] = {"name": name, "uri": uri, "uuid": dom.UUIDString(),
                                      "seconds": seconds, "state": desc}
            result.update(_screenshot(conn, dom, shot, image_id))
            result["kept_running"] = keep_running
            ok = True
            return result
        except libvirt.libvirtError as e:
            raise translate(e, uri=uri, doing=f"boot-checking domain '{name}'", step=step,
                            image_id=image_id) from None
        finally:
            if started and not (ok and keep_running):
                with contextlib.suppress(libvirt.libvirtError):
                    d = conn.lookupByName(name)
                    if d.isActive():
                        d.destroy()
