"""What a guest's screen says: a pure classifier (VGA text buffer + screenshot → verdict) and the
rule for when a verdict is stable. No libvirt here (:func:`pipeline.tools.bootcheck.boot_check` feeds it).

Verdicts: ``prompt`` (a text-mode OS or command prompt is up), ``desktop`` (graphics that are not an
error screen), ``bsod`` (a Windows stop screen; ``stop_code``/``stop_name`` when readable),
``no-boot-device`` (a firmware or boot-loader error, or nothing but the firmware's own lines until
time ran out), ``blank`` (black), ``crashed`` (the domain stopped; decided by the caller). While only
the firmware's lines are on screen the observation is ``booting``, which is not a verdict yet.

Text mode is read from the VGA text buffer (80x25 cells of character + attribute, CP437), not from
pixels: the screenshot's size tells text mode (720x400, 640x400, 720x350, ... are the text-mode
geometries QEMU's VGA shows) and the buffer must agree with the picture (a buffer with visible
characters behind a black picture, or a blank buffer behind a picture with content, is stale memory
of another mode: the picture wins). Graphics are classified from the screenshot: a mostly
full-screen blue field is a stop screen (XP's 0x0000AA, Windows 8's 0x1073AA, 10's 0x0078D7),
black is blank, anything else with content is a desktop.
"""

from __future__ import annotations

import base64
import io
import re
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from PIL import Image

from pipeline.core.choices import BootExpect, values

FAILURES = frozenset({"bsod", "no-boot-device", "blank", "crashed", "rebooted"})
VERDICTS = ("prompt", "desktop", "bsod", "no-boot-device", "blank", "crashed", "rebooted")
EXPECT = values(BootExpect)

COLS, ROWS = 80, 25
TEXT_BYTES = COLS * ROWS * 2  # what to read at physical 0xB8000
TEXT_WIDTHS = {720: 80, 640: 80, 360: 40, 320: 40}  # 9- or 8-pixel character cells
TEXT_HEIGHTS = {400, 350, 200}  # 25 rows of 16, 14 or 8 pixels

#: common stop codes: code → (name, what it usually means for a migrated disk)
STOP_CODES: dict[int, tuple[str, str]] = {
    0x0000000A: ("IRQL_NOT_LESS_OR_EQUAL", "a driver touched invalid memory; look for a driver of the old "
                 "hardware"),
    0x0000001A: ("MEMORY_MANAGEMENT", "memory management failure; try another memory_mib"),
    0x0000001E: ("KMODE_EXCEPTION_NOT_HANDLED", "a kernel-mode driver crashed; look for a driver of the "
                 "old hardware"),
    0x00000024: ("NTFS_FILE_SYSTEM", "the NTFS volume is damaged; check the source image"),
    0x0000003B: ("SYSTEM_SERVICE_EXCEPTION", "a system service crashed"),
    0x0000004E: ("PFN_LIST_CORRUPT", "memory list corrupted; often a driver"),
    0x00000050: ("PAGE_FAULT_IN_NONPAGED_AREA", "a driver touched invalid memory; look for a driver of "
                 "the old hardware"),
    0x0000005C: ("HAL_INITIALIZATION_FAILED", "the HAL does not suit this machine"),
    0x0000005D: ("UNSUPPORTED_PROCESSOR", "the guest does not support the emulated CPU"),
    0x00000069: ("IO1_INITIALIZATION_FAILED", "I/O system initialisation failed"),
    0x0000006B: ("PROCESS1_INITIALIZATION_FAILED", "system files are missing or damaged"),
    0x00000074: ("BAD_SYSTEM_CONFIG_INFO", "the SYSTEM hive is damaged; check the registry merge"),
    0x00000077: ("KERNEL_STACK_INPAGE_ERROR", "a kernel page could not be read from disk"),
    0x00000079: ("MISMATCHED_HAL", "the HAL does not match the kernel or the machine (ACPI)"),
    0x0000007A: ("KERNEL_DATA_INPAGE_ERROR", "kernel data could not be read from disk"),
    0x0000007B: ("INACCESSIBLE_BOOT_DEVICE", "the disk controller's driver did not load; check registry "
                 "and disk_bus"),
    0x0000007E: ("SYSTEM_THREAD_EXCEPTION_NOT_HANDLED", "a system thread crashed, often a driver of the "
                 "old hardware"),
    0x0000007F: ("UNEXPECTED_KERNEL_MODE_TRAP", "a CPU trap in kernel mode (hardware or driver)"),
    0x0000008E: ("KERNEL_MODE_EXCEPTION_NOT_HANDLED", "a kernel-mode driver crashed"),
    0x0000009C: ("MACHINE_CHECK_EXCEPTION", "the (emulated) CPU reported a machine check"),
    0x0000009F: ("DRIVER_POWER_STATE_FAILURE", "a driver failed a power transition"),
    0x000000A5: ("ACPI_BIOS_ERROR", "the ACPI tables do not suit the guest's HAL"),
    0x000000BE: ("ATTEMPTED_WRITE_TO_READONLY_MEMORY", "a driver wrote to read-only memory"),
    0x000000C2: ("BAD_POOL_CALLER", "a driver misused pool memory"),
    0x000000C5: ("DRIVER_CORRUPTED_EXPOOL", "a driver corrupted pool memory"),
    0x000000D1: ("DRIVER_IRQL_NOT_LESS_OR_EQUAL", "a driver touched invalid memory; look for a driver of "
                 "the old hardware"),
    0x000000EA: ("THREAD_STUCK_IN_DEVICE_DRIVER", "a display driver hung"),
    0x000000ED: ("UNMOUNTABLE_BOOT_VOLUME", "the boot volume could not be mounted; check disk_bus and the "
                 "file system"),
    0x000000EF: ("CRITICAL_PROCESS_DIED", "a critical system process ended; system files or registry "
                 "damaged"),
    0x000000F4: ("CRITICAL_OBJECT_TERMINATION", "a critical process ended"),
    0x00000101: ("CLOCK_WATCHDOG_TIMEOUT", "a CPU stopped answering; try vcpus: 1"),
    0x00000124: ("WHEA_UNCORRECTABLE_ERROR", "the (emulated) hardware reported a fatal error"),
    0xC000021A: ("STATUS_SYSTEM_PROCESS_TERMINATED", "winlogon or csrss ended; system files or registry "
                 "damaged"),
    0xC0000221: ("STATUS_IMAGE_CHECKSUM_MISMATCH", "a system file or driver is damaged"),
}
_BY_NAME = {name: code for code, (name, _) in STOP_CODES.items()}

_STOP_CODE_RE = re.compile(r"\bSTOP\s*:?\s*(0x[0-9A-F]{1,8})\b", re.I)
_STOP_NAME_RE = re.compile(r"\b(?:stop code|what failed)\s*:?\s*([A-Z][A-Z0-9_ ]{3,})", re.I)
_BSOD_PHRASES = re.compile(r"\*\*\* STOP|has been shut down to prevent damage|your pc ran into a problem"
                           r"|technical information:", re.I)

#: firmware / boot-loader error messages → what they mean
NO_BOOT_MESSAGES: tuple[tuple[re.Pattern[str], str], ...] = tuple(
    (re.compile(rx, re.I), hint) for rx, hint in (
        (r"no bootable device", "the firmware found nothing to boot (no boot code or no 0x55AA signature)"),
        (r"not a bootable disk", "the disk has no MBR boot signature (0x55AA)"),
        (r"boot failed", "the firmware could not boot the disk"),
        (r"could not read (the )?boot disk", "the firmware could not read the disk"),
        (r"missing operating system", "the MBR code found no loadable active partition boot sector"),
        (r"invalid partition table", "the MBR code found no single active primary partition"),
        (r"error loading operating system", "the MBR code could not read the active partition's boot "
         "sector (geometry or hidden sectors)"),
        (r"operating system not found", "the MBR code found no operating system on the active partition"),
        (r"ntldr is missing", "the partition's boot sector could not find NTLDR (wrong active partition, "
         "hidden sectors or a damaged file system)"),
        (r"bootmgr is missing", "the partition's boot sector could not find BOOTMGR (wrong active partition "
         "or hidden sectors)"),
        (r"disk read error", "the partition's boot code could not read the disk (geometry or hidden "
         "sectors)"),
        (r"non-system disk", "the partition's boot sector found no system files"),
        (r"no operating system", "the disk's boot code found no operating system"),
        (r"a disk read error occurred", "the boot loader could not read the disk"),
        (r"winload\.exe|status: 0xc000000e", "the boot manager could not find or load the OS loader (BCD "
         "or disk signature)"),
        (r"no boot device|insert (system|boot) disk", "the firmware found no boot device"),
    ))
#: lines the firmware itself (SeaBIOS, iPXE, the VGA BIOS) prints before handing over to the disk
FIRMWARE_LINES = re.compile(
    r"^(SeaBIOS|Machine UUID|iPXE|Booting from|Press (ESC|F12)|Select boot device|Plex86|"
    r"Bochs|Starting SeaBIOS|VGABios|Probing EDD|\d+\. )", re.I)


@dataclass(frozen=True)
class Observation:
    """One look at the screen: the verdict it supports (or ``booting``) and what backs it."""

    verdict: str  # a VERDICTS entry, or "booting"
    mode: str  # text | graphics | none
    text: str = ""  # the screen's text (text mode), trailing blanks removed
    stop_code: str | None = None  # "0x0000007B"
    stop_name: str | None = None  # "INACCESSIBLE_BOOT_DEVICE"
    message: str = ""  # the line that decided it ("Missing operating system")
    hint: str = ""  # what it usually means
    key: str = field(default="", compare=False)  # equal keys = the same screen (stability)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("key")
        return d


# ---------------------------------------------------------------------------------------------- text


def decode_text(buf: bytes, cols: int = COLS) -> tuple[list[str], list[int]]:
    """(lines, attributes) of a VGA text buffer: character/attribute byte pairs, CP437."""
    chars = bytes(c if c >= 0x20 else 0x20 for c in buf[0::2])
    text = chars.decode("cp437")
    rows = len(text) // cols
    return [text[r * cols:(r + 1) * cols].rstrip() for r in range(rows)], list(buf[1::2])


def _visible_cells(buf: bytes) -> int:
    """Cells showing a glyph (not a space, foreground differs from background)."""
    n = 0
    for ch, at in zip(buf[0::2], buf[1::2], strict=False):
        if ch not in (0x00, 0x20, 0xFF) and (at & 0x0F) != ((at >> 4) & 0x07):
            n += 1
    return n


def _screen_text(lines: list[str]) -> str:
    while lines and not lines[-1].strip():
        lines = lines[:-1]
    return "\n".join(lines)


def stop_info(text: str) -> tuple[str | None, str | None]:
    """(stop code "0x0000007B", name) read from a stop screen's text; None where unreadable."""
    code: int | None = None
    m = _STOP_CODE_RE.search(text)
    if m:
        code = int(m.group(1), 16)
    name = None
    upper = text.upper()
    for known in _BY_NAME:  # the name anywhere, with underscores (XP) or spaces (Windows 8+)
        if known in upper or known.replace("_", " ") in upper:
            name = known
            break
    if name is None:
        m2 = _STOP_NAME_RE.search(text)
        if m2:
            name = "_".join(m2.group(1).strip().upper().split())
    if code is None and name in _BY_NAME:
        code = _BY_NAME[name]
    if name is None and code in STOP_CODES:
        name = STOP_CODES[code][0]
    return (f"0x{code:08X}" if code is not None else None), name


def with_ocr(obs: Observation, text: str | None) -> Observation:
    """A graphics-mode stop screen completed with what OCR read on it. Names are matched with
    spaces and underscores ignored (OCR splits words; Windows 8+ writes them with spaces); a
    ``STOP: 0x...`` token is read with OCR's usual O/0 confusion undone, and when it disagrees
    with a recognised name the name wins (its glyphs are far easier to read than hex digits)."""
    if obs.verdict != "bsod" or not text or not text.strip():
        return obs
    squeezed = re.sub(r"[\s_]+", "", text.upper())
    name = next((n for n in _BY_NAME if n.replace("_", "") in squeezed), None)
    code: str | None = None
    m = re.search(r"STOP\s*:?\s*([0O][xX×][0-9A-FOo]{1,8})\b", text)
    if m:
        digits = m.group(1)[2:].upper().replace("O", "0")
        code = f"0x{int(digits, 16):08X}"
    if name is not None and (code is None or int(code, 16) != _BY_NAME[name]):
        code = f"0x{_BY_NAME[name]:08X}"
    if code is not None and name is None and int(code, 16) in STOP_CODES:
        name = STOP_CODES[int(code, 16)][0]
    if code is None and name is None:
        return replace(obs, text=text.strip())
    return replace(obs, text=text.strip(), stop_code=code, stop_name=name, hint=_stop_hint(code, name),
                   message=next((ln.strip() for ln in text.splitlines() if "STOP" in ln.upper()), ""))


def _stop_hint(code: str | None, name: str | None) -> str:
    c = int(code, 16) if code else _BY_NAME.get(name or "")
    if c in STOP_CODES:
        return STOP_CODES[c][1]
    return "see the screenshot"


def classify_text(buf: bytes, cols: int = COLS) -> Observation:
    """Verdict of a text-mode screen from its VGA buffer alone."""
    lines, attrs = decode_text(buf, cols)
    text = _screen_text(lines)
    key = "t:" + buf.hex()
    shown = [ln.strip() for ln in lines if ln.strip()]
    blue = sum(1 for a in attrs if (a >> 4) & 0x07 == 0x01) / max(1, len(attrs))
    if _STOP_CODE_RE.search(text) or _BSOD_PHRASES.search(text) or (blue > 0.5 and stop_info(text)[1]):
        code, name = stop_info(text)
        return Observation("bsod", "text", text, code, name,
                           next((s for s in shown if _STOP_CODE_RE.search(s)), shown[0] if shown else ""),
                           _stop_hint(code, name), key)
    for line in reversed(shown):  # the newest message wins
        for rx, hint in NO_BOOT_MESSAGES:
            if rx.search(line):
                return Observation("no-boot-device", "text", text, message=line, hint=hint, key=key)
    if not shown or _visible_cells(buf) == 0:
        return Observation("blank", "text", text, key=key)
    if all(FIRMWARE_LINES.match(s) for s in shown):
        return Observation("booting", "text", text, message=shown[-1], key=key)
    return Observation("prompt", "text", text, message=shown[-1], key=key)


# ---------------------------------------------------------------------------------------------- graphics


def _is_stop_blue(r: int, g: int, b: int) -> bool:
    return b >= 110 and r <= 70 and b - r >= 90 and b - g >= 40


def _is_dark(r: int, g: int, b: int) -> bool:
    return max(r, g, b) < 32


def image_key(img: Image.Image) -> str:
    """Equal for pictures that look the same (small grey thumbnail, 16 levels): cursor blinks and
    compression noise do not count as a change, a new window or message does."""
    small = img.convert("L").resize((40, 30), Image.Resampling.BOX)
    return "g:" + bytes(v >> 4 for v in small.tobytes()).hex()


def classify_image(img: Image.Image) -> Observation:
    """Verdict of a graphics-mode screen from its screenshot."""
    rgb = img.convert("RGB").resize((160, 120), Image.Resampling.NEAREST)
    raw = rgb.tobytes()
    px = [(raw[i], raw[i + 1], raw[i + 2]) for i in range(0, len(raw), 3)]
    total = len(px)
    dark = sum(1 for p in px if _is_dark(*p)) / total
    blue = sum(1 for p in px if _is_stop_blue(*p)) / total
    key = image_key(img)
    if blue >= 0.6:
        return Observation("bsod", "graphics", hint="see the screenshot (stop code not readable)", key=key)
    if dark >= 0.995:
        return Observation("blank", "graphics", key=key)
    return Observation("desktop", "graphics", key=key)


def is_text_geometry(width: int, height: int) -> bool:
    return width in TEXT_WIDTHS and height in TEXT_HEIGHTS


def classify(text_buf: bytes | None, img: Image.Image | None) -> Observation:
    """The verdict one look at the screen supports: the VGA text buffer when the screen is in text
    mode and the buffer agrees with the picture, else the picture."""
    if img is None:
        if text_buf:
            return classify_text(text_buf)
        return Observation("blank", "none", key="none")
    cols = TEXT_WIDTHS.get(img.width, COLS)
    if text_buf and is_text_geometry(img.width, img.height):
        buf = text_buf[:cols * ROWS * 2]
        lo_hi = img.convert("L").getextrema()
        lit = int(lo_hi[1]) >= 48  # type: ignore[arg-type]  # any glyph pixel (a prompt is tiny)
        if lit and _visible_cells(buf) > 0:  # buffer and picture agree: read the buffer
            return classify_text(buf, cols)
        if not lit:  # the buffer's text is not what is shown (stale memory of another mode)
            return Observation("blank", "text", key="t:" + buf.hex())
    return classify_image(img)


# ---------------------------------------------------------------------------------------------- stability

#: seconds one screen must stay the same before its verdict counts; None = only when time runs out.
#: "prompt" is for a screen whose last line is a prompt (``C:\>``, ``login:``, ``$``); other text
#: (a loader's banner while it reads the disk) must stand still for "text" seconds to count as up.
SETTLE: dict[str, float | None] = {"bsod": 2.0, "no-boot-device": 2.0, "prompt": 5.0, "text": 20.0,
                                   "desktop": 10.0, "blank": None, "booting": None}
PROMPT_LINE = re.compile(r"^(?:[A-Z]:\\[^>]*>.?|.{0,60}[$#] ?|.{0,40}login: ?|Password: ?)$")


def is_prompt_line(line: str) -> bool:
    """A DOS (``C:\\>``), Unix (``$``, ``#``, ``login:``) prompt as the screen's last line."""
    return bool(PROMPT_LINE.match(line.strip()))


class Watch:
    """Feeds observations in time order; tells when a verdict is stable.

    A verdict is stable when the same screen (equal keys) supporting it has been seen for its
    ``SETTLE`` seconds; black screens and the firmware's own lines are only decided when time runs
    out (:meth:`final`), then ``booting`` means the disk's boot code never showed anything:
    ``no-boot-device``.
    """

    def __init__(self, settle: dict[str, float | None] | None = None) -> None:
        self.settle = dict(SETTLE, **(settle or {}))
        self.last: Observation | None = None
        self.since = 0.0  # when the current screen first appeared
        self.first_seen: dict[str, float] = {}

    def add(self, t: float, obs: Observation) -> Observation | None:
        """Record ``obs`` seen at ``t`` seconds; returns it when its verdict is now stable."""
        self.first_seen.setdefault(obs.verdict, t)
        if self.last is None or self.last.key != obs.key or self.last.verdict != obs.verdict:
            self.since = t
        self.last = obs
        kind = "text" if obs.verdict == "prompt" and not is_prompt_line(obs.message) else obs.verdict
        need = self.settle.get(kind)
        if need is not None and t - self.since >= need:
            return obs
        return None

    def final(self) -> Observation:
        """The verdict when time ran out: the last screen's."""
        obs = self.last or Observation("blank", "none")
        if obs.verdict == "booting":
            return Observation("no-boot-device", obs.mode, obs.text, message=obs.message,
                               hint="the screen showed only the firmware's lines until time ran out: the "
                               "disk's MBR boot code is missing or hung", key=obs.key)
        return obs


def failure_message(verdict: dict[str, Any], expect: str = "any") -> str | None:
    """The one line a failed boot check reports (``boot check: ...``); None when it passed."""
    v = verdict.get("verdict")
    screenshot = verdict.get("screenshot")
    see = f" (screenshot {screenshot})" if screenshot else ""
    secs = verdict.get("seconds_to_verdict")
    if v == "bsod":
        code, name = verdict.get("stop_code"), verdict.get("stop_name")
        what = "guest blue-screened"
        if code or name:
            what += ", STOP " + " ".join(x for x in (code, f"({name})" if name and code else name) if x)
        return f"boot check: {what}: {verdict.get('hint') or 'see the screenshot'}{see}"
    if v == "no-boot-device":
        return (f"boot check: guest did not boot, the screen says '{verdict.get('message', '')}': "
                f"{verdict.get('hint', '')}{see}")
    if v == "blank":
        return f"boot check: the guest's screen stayed black for {secs} s{see}"
    if v == "crashed":
        hint = verdict.get("hint")
        return f"boot check: the domain stopped after {secs} s: {verdict.get('message', '')}" + \
            (f" ({hint})" if hint else "")
    if v == "rebooted":
        what = verdict.get("message") or "the guest restarted itself"
        return f"boot check: {what}: {verdict.get('hint', '')}{see}"
    if expect != "any" and v != expect:
        return f"boot check: expected {expect}, the guest shows {v}{see}"
    return None


def reboot_hint(last: Observation | None) -> str:
    """What a guest restarting during the boot check usually means, from the screen seen before."""
    if last is not None and last.verdict == "bsod":
        code = " ".join(x for x in (last.stop_code, last.stop_name) if x)
        return f"it showed a stop screen{' (' + code + ')' if code else ''} first and rebooted (AutoReboot)"
    return ("a stop screen that reboots at once (CrashControl\\AutoReboot=1: keep_autoreboot), a triple "
            "fault or a boot loader giving up; the last screen before the restart is kept")


def recorded(receipt: dict[str, Any] | None, error: dict[str, Any] | None) -> dict[str, Any] | None:
    """The boot check a define step recorded: from its error record when that is the newer (a
    failed check), else from its receipt's ``result.boot_check``; None when there was none."""
    if error is not None and (receipt is None or str(error.get("finished") or "")
                              >= str(receipt.get("finished") or "")):
        details = error.get("details")
        found = details.get("boot_check") if isinstance(details, dict) else None
        return found if isinstance(found, dict) else None
    result = (receipt or {}).get("result")
    found = result.get("boot_check") if isinstance(result, dict) else None
    return found if isinstance(found, dict) else None


def short(verdict: dict[str, Any] | None) -> str:
    """One token for tables: ``prompt``, ``bsod:0x0000007B``; ``-`` when there was no check."""
    if not verdict:
        return "-"
    out = str(verdict.get("verdict", "?"))
    return f"{out}:{verdict['stop_code']}" if verdict.get("stop_code") else out


def thumbnail_data_uri(path: str | None, width: int = 240) -> str | None:
    """A small PNG of the screenshot at ``path`` as a ``data:`` URI (self-contained reports)."""
    if not path:
        return None
    try:
        with Image.open(path) as src:
            small = src.convert("RGB")
        small.thumbnail((width, width))
        out = io.BytesIO()
        small.save(out, format="PNG", optimize=True)
    except (OSError, ValueError, SyntaxError):
        return None
    return "data:image/png;base64," + base64.b64encode(out.getvalue()).decode("ascii")
