"""pipeline.tools.screen: the boot check's classifier on synthetic screens (pure, fast)."""

from __future__ import annotations

import pytest
from PIL import Image, ImageDraw

from pipeline.tools import screen
from pipeline.tools.screen import Observation, Watch, classify, classify_image, classify_text

WHITE_ON_BLUE, GREY_ON_BLACK = 0x1F, 0x07


def vga(lines: list[str], attr: int = GREY_ON_BLACK, cols: int = 80) -> bytes:
    """A VGA text buffer (character, attribute pairs; CP437) showing ``lines`` from the top."""
    cells = bytearray()
    for row in range(25):
        text = (lines[row] if row < len(lines) else "").ljust(cols)[:cols].encode("cp437")
        for ch in text:
            cells += bytes([ch, attr])
    return bytes(cells)


def text_picture(visible: bool = True, size: tuple[int, int] = (720, 400)) -> Image.Image:
    """What QEMU's screenshot of a text-mode screen looks like: black with some light glyphs."""
    img = Image.new("RGB", size, (0, 0, 0))
    if visible:
        ImageDraw.Draw(img).text((8, 8), "C:\\>", fill=(170, 170, 170))
    return img


def stop_field(color: tuple[int, int, int], size: tuple[int, int] = (640, 480)) -> Image.Image:
    img = Image.new("RGB", size, color)
    d = ImageDraw.Draw(img)
    for y in range(20, 400, 16):
        d.text((10, y), "A problem has been detected and Windows has been shut down", fill=(255, 255, 255))
    return img


def desktop(size: tuple[int, int] = (800, 600)) -> Image.Image:
    """Something like XP's desktop: a sky-and-hill background, a blue taskbar, a window, icons."""
    img = Image.new("RGB", size, (90, 140, 230))  # light sky blue: NOT a stop screen's blue
    d = ImageDraw.Draw(img)
    d.rectangle((0, 380, size[0], size[1]), fill=(60, 150, 40))  # the hill
    d.rectangle((0, size[1] - 30, size[0], size[1]), fill=(36, 94, 220))  # taskbar
    d.rectangle((0, size[1] - 30, 100, size[1]), fill=(60, 160, 60))  # start button
    d.rectangle((200, 100, 600, 400), fill=(236, 233, 216), outline=(0, 84, 227), width=20)  # a window
    for y in range(20, 300, 70):
        d.rectangle((20, y, 52, y + 32), fill=(250, 220, 80))  # icons
    return img


# ---------------------------------------------------------------------------------------------- text


def test_dos_prompt_is_a_prompt_with_its_text() -> None:
    buf = vga(["SeaBIOS (version 1.16.2-debian-1.16.2-1)", "", "Booting from Hard Disk...",
               "Starting MS-DOS...", "", "C:\\>"])
    obs = classify(buf, text_picture())
    assert (obs.verdict, obs.mode, obs.message) == ("prompt", "text", "C:\\>")
    assert obs.text.splitlines()[-1] == "C:\\>" and "Starting MS-DOS..." in obs.text


def test_firmware_lines_alone_are_not_a_verdict_yet() -> None:
    buf = vga(["SeaBIOS (version 1.16.2-debian-1.16.2-1)", "Machine UUID 2787be9b-dd44",
               "", "iPXE (http://ipxe.org) 00:03.0 CA00 PCI2.10 PnP PMM+02FCF170+02F0F170 CA00", "",
               "Booting from Hard Disk..."])
    obs = classify(buf, text_picture())
    assert obs.verdict == "booting" and obs.message == "Booting from Hard Disk..."


@pytest.mark.parametrize("message", [
    "No bootable device.", "Boot failed: not a bootable disk", "Missing operating system",
    "Invalid partition table", "Error loading operating system", "NTLDR is missing",
    "BOOTMGR is missing", "Disk read error", "Operating system not found",
    "Non-System disk or disk error", "A disk read error occurred",
])
def test_boot_failure_messages(message: str) -> None:
    buf = vga(["SeaBIOS (version 1.16.2)", "Booting from Hard Disk...", message, "Press any key to restart"])
    obs = classify(buf, text_picture())
    assert (obs.verdict, obs.message) == ("no-boot-device", message)
    assert obs.hint
    line = screen.failure_message({**obs.to_dict(), "screenshot": "/w/boot.png"})
    assert line is not None and f"the screen says '{message}'" in line and "\n" not in line


def test_text_mode_stop_screen_with_code_and_name() -> None:
    buf = vga(["", "A problem has been detected and Windows has been shut down to prevent damage",
               "", "INACCESSIBLE_BOOT_DEVICE", "", "Technical information:", "",
               "*** STOP: 0x0000007B (0xF78D2524,0xC0000034,0x00000000,0x00000000)"], WHITE_ON_BLUE)
    obs = classify(buf, text_picture())
    assert (obs.verdict, obs.stop_code, obs.stop_name) == ("bsod", "0x0000007B", "INACCESSIBLE_BOOT_DEVICE")
    line = screen.failure_message(obs.to_dict())
    assert line == ("boot check: guest blue-screened, STOP 0x0000007B (INACCESSIBLE_BOOT_DEVICE): the disk "
                    "controller's driver did not load; check registry and disk_bus")


def test_stop_code_without_name_gets_its_name_from_the_table() -> None:
    buf = vga(["*** STOP: 0x000000ED (0x81234567,0xC0000006,0x00000000,0x00000000)"], WHITE_ON_BLUE)
    obs = classify_text(buf)
    assert (obs.stop_code, obs.stop_name) == ("0x000000ED", "UNMOUNTABLE_BOOT_VOLUME")
    assert "boot volume" in obs.hint


@pytest.mark.parametrize("text,code,name", [
    ("Stop code: INACCESSIBLE BOOT DEVICE", "0x0000007B", "INACCESSIBLE_BOOT_DEVICE"),
    ("STOP: 0xc000021a {Fatal System Error}", "0xC000021A", "STATUS_SYSTEM_PROCESS_TERMINATED"),
    ("*** STOP: 0x7E (0xC0000005)", "0x0000007E", "SYSTEM_THREAD_EXCEPTION_NOT_HANDLED"),
    ("Stop code: SOME_NEW_FAILURE", None, "SOME_NEW_FAILURE"),
    ("nothing readable", None, None),
])
def test_stop_info(text: str, code: str | None, name: str | None) -> None:
    assert screen.stop_info(text) == (code, name)


def test_blue_text_screen_without_a_stop_is_not_a_bsod() -> None:
    """Norton Commander, EDIT and Ghost itself are white on blue too."""
    buf = vga(["  Left     Files     Commands     Options     Right", "", "  C:\\DOS   Name   Size"],
              WHITE_ON_BLUE)
    assert classify(buf, text_picture()).verdict == "prompt"


def test_text_buffer_blank() -> None:
    assert classify(vga([]), text_picture(visible=False)).verdict == "blank"
    # characters drawn in the background colour are not visible either
    assert classify_text(vga(["hidden"], attr=0x00)).verdict == "blank"


def test_stale_text_buffer_behind_graphics_is_ignored() -> None:
    """A graphics mode leaves the old text in 0xB8000: the picture decides."""
    stale = vga(["SeaBIOS (version 1.16.2)", "Booting from Hard Disk...", "C:\\>"])
    assert classify(stale, Image.new("RGB", (640, 480))).verdict == "blank"
    assert classify(stale, stop_field((0, 0, 170))).verdict == "bsod"
    assert classify(stale, desktop()).verdict == "desktop"
    # a text-mode sized picture that is black although the buffer has visible text: not shown
    obs = classify(stale, text_picture(visible=False))
    assert (obs.verdict, obs.mode) == ("blank", "text")
    # a graphics mode with a text-mode size (640x400) and a blank buffer: the picture decides
    assert classify(vga([]), desktop((640, 400))).verdict == "desktop"


def test_forty_column_text_mode() -> None:
    buf = vga(["C:\\>"], cols=40) + bytes(2000)
    obs = classify(buf, text_picture(size=(360, 400)))
    assert (obs.verdict, obs.message) == ("prompt", "C:\\>")


def test_no_picture_uses_the_buffer() -> None:
    assert classify(vga(["C:\\>"]), None).verdict == "prompt"
    assert classify(None, None).verdict == "blank"


# ---------------------------------------------------------------------------------------------- graphics


@pytest.mark.parametrize("color", [(0, 0, 170), (16, 115, 170), (0, 120, 215)])  # XP, Win 8, Win 10
def test_blue_field_is_a_stop_screen(color: tuple[int, int, int]) -> None:
    obs = classify_image(stop_field(color))
    assert (obs.verdict, obs.mode, obs.stop_code) == ("bsod", "graphics", None)
    assert screen.failure_message(obs.to_dict()).startswith("boot check: guest blue-screened: ")


def test_black_is_blank_and_desktop_is_desktop() -> None:
    assert classify_image(Image.new("RGB", (1024, 768))).verdict == "blank"
    assert classify_image(Image.new("L", (640, 480), 8)).verdict == "blank"  # near black, grey mode
    assert classify_image(desktop()).verdict == "desktop"
    welcome = Image.new("RGB", (800, 600), (90, 126, 220))  # XP's welcome screen blue is lighter
    assert classify_image(welcome).verdict == "desktop"
    small_cursor = Image.new("RGB", (640, 480))
    ImageDraw.Draw(small_cursor).rectangle((0, 0, 8, 2), fill=(255, 255, 255))
    assert classify_image(small_cursor).verdict == "blank"


def test_image_key_ignores_noise_but_not_change() -> None:
    a = desktop()
    b = a.copy()
    b.putpixel((400, 300), (0, 0, 0))
    c = a.copy()
    ImageDraw.Draw(c).rectangle((300, 200, 500, 300), fill=(0, 0, 0))
    assert screen.image_key(a) == screen.image_key(b) != screen.image_key(c)


# ---------------------------------------------------------------------------------------------- stability


def _obs(verdict: str, key: str, message: str = "") -> Observation:
    return Observation(verdict, "text", message=message, key=key)


def test_watch_waits_for_a_stable_screen() -> None:
    w = Watch()
    assert w.add(1, _obs("booting", "bios")) is None
    assert w.add(2, _obs("prompt", "dos1", "C:\\>")) is None
    assert w.add(5, _obs("prompt", "dos2", "C:\\>")) is None  # the screen changed: the clock restarts
    assert w.add(9, _obs("prompt", "dos2", "C:\\>")) is None
    got = w.add(10, _obs("prompt", "dos2", "C:\\>"))
    assert got is not None and got.verdict == "prompt"
    assert w.first_seen == {"booting": 1, "prompt": 2}


def test_text_without_a_prompt_line_must_stand_still_longer() -> None:
    """A loader's banner while it reads the disk (IO.SYS, before COMMAND.COM) is not yet "up"."""
    w = Watch()
    for t in range(1, 21):
        assert w.add(t, _obs("prompt", "loader", "All Rights Reserved")) is None
    assert w.add(21, _obs("prompt", "loader", "All Rights Reserved")).verdict == "prompt"


@pytest.mark.parametrize(("line", "prompt"), [
    ("C:\\>", True), ("C:\\DOS>", True), ("A:\\>", True), ("root@debian:~#", True), ("user@h:~$ ", True),
    ("debian login:", True), ("All Rights Reserved", False), ("Starting MS-DOS...", False),
    ("1981-1999.", False),
])
def test_prompt_lines(line: str, prompt: bool) -> None:
    assert screen.is_prompt_line(line) is prompt


def test_watch_failures_settle_fast_blank_and_firmware_only_at_the_end() -> None:
    w = Watch()
    w.add(1, _obs("bsod", "s"))
    assert w.add(3, _obs("bsod", "s")).verdict == "bsod"
    w = Watch()
    for t in range(1, 100):
        assert w.add(t, _obs("blank", "b")) is None
    assert w.final().verdict == "blank"
    w = Watch()
    for t in range(1, 100):
        assert w.add(t, Observation("booting", "text", message="Booting from Hard Disk...", key="f")) is None
    final = w.final()
    assert (final.verdict, final.message) == ("no-boot-device", "Booting from Hard Disk...")
    assert "MBR boot code" in screen.failure_message(final.to_dict())
    assert Watch().final().verdict == "blank"


@pytest.mark.parametrize("verdict,expect,fails", [
    ("prompt", "any", False), ("desktop", "any", False), ("prompt", "prompt", False),
    ("desktop", "prompt", True), ("prompt", "desktop", True), ("blank", "any", True),
    ("crashed", "any", True), ("bsod", "desktop", True), ("no-boot-device", "any", True),
])
def test_failure_message_by_verdict_and_expectation(verdict: str, expect: str, fails: bool) -> None:
    line = screen.failure_message({"verdict": verdict, "seconds_to_verdict": 3.0, "message": "x"}, expect)
    assert (line is not None) == fails
    if line:
        assert line.startswith("boot check: ") and "\n" not in line


def test_recorded_prefers_the_newer_record() -> None:
    ok = {"finished": "2026-01-01T10:00:00", "result": {"boot_check": {"verdict": "prompt"}}}
    err = {"finished": "2026-01-01T11:00:00", "details": {"boot_check": {"verdict": "bsod",
                                                                          "stop_code": "0x0000007B",
                                                                          "seconds_to_verdict": 8.1}}}
    assert screen.recorded(ok, None) == {"verdict": "prompt"}
    assert screen.recorded(ok, err)["verdict"] == "bsod"
    assert screen.recorded({**ok, "finished": "2026-01-01T12:00:00"}, err)["verdict"] == "prompt"
    assert screen.recorded(None, {"finished": "x", "error": "other"}) is None
    assert screen.short(screen.recorded(ok, err)) == "bsod:0x0000007B"
    assert screen.short(None) == "-"


def test_thumbnail_data_uri(tmp_path) -> None:
    desktop().save(tmp_path / "shot.png")
    uri = screen.thumbnail_data_uri(str(tmp_path / "shot.png"))
    assert uri is not None and uri.startswith("data:image/png;base64,")
    assert screen.thumbnail_data_uri(str(tmp_path / "missing.png")) is None
    (tmp_path / "bad.png").write_bytes(b"not a png")
    assert screen.thumbnail_data_uri(str(tmp_path / "bad.png")) is None


@pytest.mark.parametrize(("ocr", "code", "name"), [
    # what tesseract 5.3 read on the XP-like graphics stop screen of tests/test_boot_check.py
    ("A problem has been detected and Windows has been shut down to prevent damage\n\n"
     "INACCESSIBLE_BOOT_DEVICE\n\nmex STOP: OxO000007B (OxF78D2524 , OxCO0O0034 , 0x00000000)",
     "0x0000007B", "INACCESSIBLE_BOOT_DEVICE"),
    ("INACCESS IBLE_BOOT_DEVICE\n*** STOP: GxOQGOOG07B", "0x0000007B", "INACCESSIBLE_BOOT_DEVICE"),
    ("Your PC ran into a problem\nStop code: CRITICAL PROCESS DIED", "0x000000EF", "CRITICAL_PROCESS_DIED"),
    ("Your PC ran into a problem\nStop code: SOME NEW FAILURE", None, None),  # not in the table
    ("Stop code: INACCESSIBLE BOOT DEVICE", "0x0000007B", "INACCESSIBLE_BOOT_DEVICE"),
    ("*** STOP: 0x000000ED (0x81)", "0x000000ED", "UNMOUNTABLE_BOOT_VOLUME"),
    ("*** STOP: 0x0000001E but NTFS_FILE_SYSTEM", "0x00000024", "NTFS_FILE_SYSTEM"),  # the name wins
])
def test_with_ocr(ocr: str, code: str | None, name: str | None) -> None:
    obs = screen.with_ocr(classify_image(stop_field((0, 0, 170))), ocr)
    assert (obs.verdict, obs.stop_code, obs.stop_name) == ("bsod", code, name)
    if code:
        assert obs.hint == screen.STOP_CODES[int(code, 16)][1]


def test_with_ocr_leaves_other_verdicts_and_empty_text_alone() -> None:
    desk = classify_image(desktop())
    assert screen.with_ocr(desk, "*** STOP: 0x0000007B") == desk
    bsod = classify_image(stop_field((0, 0, 170)))
    assert screen.with_ocr(bsod, None) == bsod and screen.with_ocr(bsod, "  ") == bsod
