"""libvirt operations through libvirt-python: connections, host facts, idempotent define, undefine,
start, domain state. The boot check (throwaway overlays, screen capture) is :mod:`pipeline.tools.bootcheck`;
what the screen means is decided by :mod:`pipeline.tools.screen`.

Every libvirt failure becomes ONE line: an unreachable daemon is a
:class:`~pipeline.core.errors.TransientError` (retry later), permission problems and XML libvirt refuses
are :class:`~pipeline.core.errors.InputError`, a guest that does not boot is a :class:`BootCheckError`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import threading
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import libvirt

from pipeline.core.choices import Step
from pipeline.core.errors import Gho2KvmError, InputError, TransientError
from pipeline.model.host import ARCHES, HostCaps, host_caps_from_xml


class BootCheckError(Gho2KvmError):
    """The domain did not start, or its screen shows a failure (``details``: the verdict)."""

    def __init__(self, message: str, *, image_id: str | None = None, step: str | None = None,
                 details: dict[str, Any] | None = None) -> None:
        self.details = {"boot_check": details} if details is not None else None
        super().__init__(message, image_id=image_id, step=step)


def _quiet(_ctx: object, _err: object) -> None:
    """libvirt prints every error to stderr by default; we report them ourselves."""


def quiet_errors() -> None:
    """Stop libvirt printing its errors to stderr (they become our one-line errors); the CLI calls it."""
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


@contextlib.contextmanager
def hold(uri: str, *, image_id: str | None = None) -> Iterator[None]:
    """Keep the in-process test driver's state (``test:///...``) alive across several calls: it is
    freed when the process's last connection to it closes. A no-op for every other URI."""
    if not uri.startswith("test:"):
        yield
        return
    with connect(uri, step=Step.DEFINE, image_id=image_id):
        yield


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


class _Conn(Protocol):
    def getCapabilities(self) -> str: ...
    def getDomainCapabilities(self, emulatorbin: str | None, arch: str | None, machine: str | None,
                              virttype: str | None, flags: int = 0) -> str: ...
    def getType(self) -> str: ...
    def getURI(self) -> str: ...


def host_caps(conn: _Conn, *, prefer_kvm: bool = True, arches: tuple[str, ...] = ARCHES) -> HostCaps:
    """Fetch what the libvirt host behind ``conn`` offers (capabilities, domain capabilities per arch)
    and read it with :func:`pipeline.model.host.host_caps_from_xml`. ``prefer_kvm``: the caller passes
    ``not settings.force_tcg``."""
    def domain_caps(emulator: str | None, arch: str, machine: str, virttype: str) -> str | None:
        try:
            return conn.getDomainCapabilities(emulator, arch, machine, virttype, 0)
        except libvirt.libvirtError:
            return None  # older/other drivers have none

    return host_caps_from_xml(conn.getCapabilities(), uri=conn.getURI(), driver=conn.getType(),
                              domain_caps=domain_caps, prefer_kvm=prefer_kvm, arches=arches)


class _Recorded:
    """A connection's capability answers, recorded (live) or replayed (from a run's cache)."""

    def __init__(self, conn: _Conn | None, doc: dict[str, Any] | None = None) -> None:
        self.conn = conn
        self.doc: dict[str, Any] = doc or {}
        self.doc.setdefault("domain", {})

    def getCapabilities(self) -> str:  # noqa: N802 - the libvirt name
        if "caps" not in self.doc:
            assert self.conn is not None
            self.doc["caps"] = self.conn.getCapabilities()
            self.doc["uri"], self.doc["type"] = self.conn.getURI(), self.conn.getType()
        return str(self.doc["caps"])

    def getDomainCapabilities(self, emulatorbin: str | None, arch: str | None, machine: str | None,  # noqa: N802
                              virttype: str | None, flags: int = 0) -> str:
        key = json.dumps([emulatorbin, arch, machine, virttype, flags])
        dom = self.doc["domain"]
        if key not in dom:
            if self.conn is None:  # not asked when the cache was written: read them live
                raise KeyError(key)
            try:
                dom[key] = self.conn.getDomainCapabilities(emulatorbin, arch, machine, virttype, flags)
            except libvirt.libvirtError:
                dom[key] = None
        if dom[key] is None:
            raise libvirt.libvirtError("no domain capabilities")
        return str(dom[key])

    def getType(self) -> str:  # noqa: N802
        self.getCapabilities()
        return str(self.doc["type"])

    def getURI(self) -> str:  # noqa: N802
        self.getCapabilities()
        return str(self.doc["uri"])


#: the run's capability cache (:func:`caps_once_per_run`): a folder luigi's forked workers share
_run_caps: list[Path] = []


@contextlib.contextmanager
def caps_once_per_run() -> Iterator[None]:
    """Inside the block, host and domain capabilities are read once per libvirt URI (not per image):
    the first reader records libvirt's XML answers in a run folder (``$TMPDIR/gho2kvm-caps-*``, which
    luigi's forked worker processes inherit), later ones replay them. Removed when the block ends."""
    folder = Path(tempfile.mkdtemp(prefix="gho2kvm-caps-"))
    _run_caps.append(folder)
    try:
        yield
    finally:
        _run_caps.remove(folder)
        shutil.rmtree(folder, ignore_errors=True)


def host_caps_for_uri(uri: str, *, prefer_kvm: bool = True, image_id: str | None = None) -> HostCaps:
    """:func:`host_caps` for the libvirt host at ``uri`` (once per run inside :func:`caps_once_per_run`)."""
    cached = None
    if _run_caps:
        cached = _run_caps[-1] / (hashlib.sha256(uri.encode()).hexdigest()[:24] + ".json")
        try:
            doc = json.loads(cached.read_text())
        except (OSError, ValueError):
            doc = None
        if isinstance(doc, dict) and doc.get("for") == uri:
            with contextlib.suppress(libvirt.libvirtError, KeyError, ValueError):
                return host_caps(_Recorded(None, doc), prefer_kvm=prefer_kvm)
    with connect(uri, step=Step.XML_RENDER, image_id=image_id) as conn:
        rec = _Recorded(conn, {"for": uri})
        try:
            caps = host_caps(rec, prefer_kvm=prefer_kvm)
        except libvirt.libvirtError as e:
            raise translate(e, uri=uri, doing="reading capabilities", step=Step.XML_RENDER,
                            image_id=image_id) from None
    if cached is not None:
        with contextlib.suppress(OSError):
            tmp = cached.with_name(f".{cached.name}.{os.getpid()}")
            tmp.write_text(json.dumps(rec.doc))
            os.replace(tmp, cached)
    return caps


# ---------------------------------------------------------------------------------------------
# events

_EVENT_LOOP: threading.Thread | None = None
_EVENT_LOCK = threading.Lock()


def ensure_event_loop() -> None:
    """libvirt's default event loop, run by one daemon thread of this process (started once). It must
    exist before a connection is opened for that connection to deliver domain events (the reboot
    event of the boot check)."""
    global _EVENT_LOOP
    with _EVENT_LOCK:
        if _EVENT_LOOP is not None:
            return
        libvirt.virEventRegisterDefaultImpl()

        def loop() -> None:
            while True:
                libvirt.virEventRunDefaultImpl()

        _EVENT_LOOP = threading.Thread(target=loop, name="libvirt-events", daemon=True)
        _EVENT_LOOP.start()


def on_reboot(conn: libvirt.virConnect, dom: libvirt.virDomain, callback: Callable[[], None]) -> int:
    """Call ``callback`` (from the event thread) each time the guest resets itself: libvirt's
    ``VIR_DOMAIN_EVENT_ID_REBOOT``, which QEMU's reset of the machine raises (a guest restart, a
    triple fault). Returns the id for :func:`stop_events`."""
    return conn.domainEventRegisterAny(dom, libvirt.VIR_DOMAIN_EVENT_ID_REBOOT,
                                       lambda *_args: callback(), None)


def stop_events(conn: libvirt.virConnect, callback_id: int) -> None:
    with contextlib.suppress(libvirt.libvirtError):
        conn.domainEventDeregisterAny(callback_id)


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
    step = Step.DEFINE
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
# start, state

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


def describe_state(dom: libvirt.virDomain) -> tuple[str, bool]:
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


def qemu_log_tail(uri: str, name: str) -> str:
    if not uri.startswith("qemu:///"):
        return ""
    path = Path("/var/log/libvirt/qemu") / f"{name}.log"
    try:
        lines = [ln.strip() for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    return (" | qemu log: " + " | ".join(lines[-2:])[:400]) if lines else ""


def start_domain(uri: str, name: str, *, image_id: str | None = None) -> dict[str, Any]:
    """Start domain ``name`` and leave it running (``start: true`` without a boot check)."""
    with connect(uri, step=Step.DEFINE, image_id=image_id) as conn:
        dom = startable(conn, uri, name, image_id)
        start_checked(dom.create, uri, name, image_id)
        try:
            desc, _ = describe_state(dom)
            return {"name": name, "uri": uri, "uuid": dom.UUIDString(), "state": desc, "kept_running": True}
        except libvirt.libvirtError as e:
            raise translate(e, uri=uri, doing=f"starting domain '{name}'", step=Step.DEFINE,
                            image_id=image_id) from None


def startable(conn: libvirt.virConnect, uri: str, name: str, image_id: str | None) -> libvirt.virDomain:
    try:
        dom = _lookup(conn, name=name)
        active = dom is not None and dom.isActive()
    except libvirt.libvirtError as e:
        raise translate(e, uri=uri, doing=f"looking up domain '{name}'", step=Step.DEFINE,
                        image_id=image_id) from None
    if dom is None:
        raise InputError(f"no domain named '{name}' on {uri}", image_id=image_id, step=Step.DEFINE)
    if active:
        raise InputError(f"domain '{name}' on {uri} is already running; shut it down before a "
                         f"boot check", image_id=image_id, step=Step.DEFINE)
    return dom


def start_checked(start: Callable[[], Any], uri: str, name: str, image_id: str | None) -> Any:
    """``start()`` (create the domain), its failure as one line."""
    try:
        return start()
    except libvirt.libvirtError as e:
        err = translate(e, uri=uri, doing=f"starting domain '{name}'", step=Step.DEFINE, image_id=image_id)
        if isinstance(err, TransientError):
            raise err from None
        raise BootCheckError(f"boot check: domain '{name}' on {uri} failed to start: {_msg(e)}",
                             image_id=image_id, step=Step.DEFINE) from None
