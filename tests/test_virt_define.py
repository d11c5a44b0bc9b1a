"""pipeline.tools.virt against the in-process libvirt test driver (test:///default): fast."""

from __future__ import annotations

import dataclasses
import struct
import zlib

import libvirt
import pytest

from pipeline.domain import DomainSpec, build_domain, render
from pipeline.errors import InputError, TransientError
from pipeline.tools import virt

URI = "test:///default"
SPEC = DomainSpec(name="gho-xp", image_id="gho-xp", disk_path="/var/tmp/gho-xp.raw", os_major=5, os_minor=1)


@pytest.fixture
def host(test_conn):
    return virt.host_caps_for_uri(URI)


def _xml(host, **changes) -> str:
    return render(build_domain(dataclasses.replace(SPEC, **changes), host))


def test_define_created_unchanged_updated(test_conn, host) -> None:
    xml = _xml(host)
    r = virt.define(URI, xml, image_id="gho-xp")
    assert (r.action, r.name, r.uri) == ("created", "gho-xp", URI)
    assert r.to_dict() == {"action": "created", "name": "gho-xp", "uuid": r.uuid, "uri": URI,
                           "autostart": False}
    assert test_conn.lookupByName("gho-xp").UUIDString() == r.uuid
    assert virt.define(URI, xml).action == "unchanged"
    assert virt.define(URI, _xml(host, memory_mib=768)).action == "updated"
    assert test_conn.lookupByName("gho-xp").info()[1] == 768 * 1024
    assert virt.define(URI, _xml(host, memory_mib=768)).action == "unchanged"


def test_autostart(test_conn, host) -> None:
    xml = _xml(host)
    virt.define(URI, xml)
    r = virt.define(URI, xml, autostart=True)
    assert (r.action, r.autostart) == ("updated", True)
    assert test_conn.lookupByName("gho-xp").autostart() == 1
    assert virt.define(URI, xml, autostart=True).action == "unchanged"
    assert virt.define(URI, xml, autostart=False).action == "updated"
    assert test_conn.lookupByName("gho-xp").autostart() == 0


def test_name_clash_refused(test_conn, host) -> None:
    virt.define(URI, _xml(host, uuid="11111111-2222-3333-4444-555555555555"))
    with pytest.raises(InputError, match="already exists .* refusing to overwrite") as exc:
        virt.define(URI, _xml(host, memory_mib=1024), image_id="gho-xp")
    assert exc.value.image_id == "gho-xp" and "\n" not in str(exc.value)
    # untouched
    assert test_conn.lookupByName("gho-xp").info()[1] == 512 * 1024


def test_uuid_clash_refused(test_conn, host) -> None:
    virt.define(URI, _xml(host))
    with pytest.raises(InputError, match="already used .* by domain 'gho-xp'"):
        virt.define(URI, _xml(host, name="someone-else"))


def test_builtin_test_domain_not_overwritten(test_conn, host) -> None:
    with pytest.raises(InputError, match="named 'test' already exists"):
        virt.define(URI, _xml(host, name="test"))


def test_schema_error_is_one_line_input_error(test_conn, host) -> None:
    bad = _xml(host).replace("<memballoon", "<bogus /><memballoon")
    with pytest.raises(InputError, match="refused defining domain 'gho-xp'.*validate") as exc:
        virt.define(URI, bad)
    assert "\n" not in str(exc.value)
    with pytest.raises(InputError, match="not well-formed"):
        virt.define(URI, "<domain>")
    with pytest.raises(InputError, match="needs both <name> and <uuid>"):
        virt.define(URI, "<domain type='qemu'><name>x</name></domain>")


def test_unreachable_daemon_is_transient() -> None:
    uri = "qemu+unix:///system?socket=/nonexistent/libvirt-sock"
    with pytest.raises(TransientError, match="unreachable") as exc:
        virt.define(uri, "<domain type='qemu'><name>x</name><uuid>" + "0" * 8 + "-0000-0000-0000-"
                    + "0" * 12 + "</uuid></domain>", image_id="img")
    assert uri in str(exc.value) and exc.value.transient and exc.value.image_id == "img"
    with pytest.raises(TransientError):
        virt.host_caps_for_uri(uri)


def test_bad_uri_is_input_error() -> None:
    with pytest.raises(InputError, match="cannot connect to libvirt at test:///nonexistent/dir.xml"):
        virt.host_caps_for_uri("test:///nonexistent/dir.xml")


def test_permission_denied_is_input_error() -> None:
    msg = "Failed to connect socket to '/run/libvirt/libvirt-sock': Permission denied"
    e = libvirt.libvirtError(msg)
    e.err = (libvirt.VIR_ERR_SYSTEM_ERROR, libvirt.VIR_FROM_RPC, msg, 2, None, None, None, 0, 0)
    err = virt.translate(e, uri="qemu:///system", doing="connecting", step="define", connecting=True)
    assert isinstance(err, InputError) and "permission denied" in str(err)


def test_undefine(test_conn, host) -> None:
    virt.define(URI, _xml(host))
    assert virt.undefine(URI, "gho-xp") is True
    assert virt.undefine(URI, "gho-xp") is False
    with pytest.raises(libvirt.libvirtError):
        test_conn.lookupByName("gho-xp")


def test_boot_check_test_driver(test_conn, host, tmp_path) -> None:
    virt.define(URI, _xml(host))
    r = virt.boot_check(URI, "gho-xp", 0.2, tmp_path / "shot.png", image_id="gho-xp")
    assert (r["state"], r["mime"], r["kept_running"]) == ("running", "image/png", False)
    assert (tmp_path / "shot.png").read_bytes().startswith(b"\x89PNG")
    assert not test_conn.lookupByName("gho-xp").isActive()
    r = virt.boot_check(URI, "gho-xp", 0.1, tmp_path / "shot2.png", keep_running=True)
    assert r["kept_running"] and test_conn.lookupByName("gho-xp").isActive()
    with pytest.raises(InputError, match="already running"):
        virt.boot_check(URI, "gho-xp", 0.1, tmp_path / "shot3.png")
    test_conn.lookupByName("gho-xp").destroy()
    # the test driver delivers a (grey) PNG: converted for a .ppm target
    r = virt.boot_check(URI, "gho-xp", 0.1, tmp_path / "x.ppm")
    assert (tmp_path / "x.ppm").read_bytes().startswith(b"P6\n%d %d\n255\n" % (r["width"], r["height"]))
    assert not test_conn.lookupByName("gho-xp").isActive()
    with pytest.raises(InputError, match="no domain named"):
        virt.boot_check(URI, "nope", 0.1, tmp_path / "x.ppm")


def test_ppm_to_png() -> None:
    w, h = 3, 2
    pixels = bytes(range(w * h * 3))
    ppm = b"P6\n# comment\n3 2\n255\n" + pixels
    png, pw, ph = virt.ppm_to_png(ppm)
    assert (pw, ph) == (w, h) and png.startswith(b"\x89PNG\r\n\x1a\n")
    ihdr_len = struct.unpack(">I", png[8:12])[0]
    pos = 8 + 12 + ihdr_len
    idat_len = struct.unpack(">I", png[pos:pos + 4])[0]
    assert png[pos + 4:pos + 8] == b"IDAT"
    raw = zlib.decompress(png[pos + 8:pos + 8 + idat_len])
    assert raw == b"\x00" + pixels[:9] + b"\x00" + pixels[9:]


def test_png_ppm_roundtrip() -> None:
    w, h = 5, 4
    pixels = bytes((i * 37) % 256 for i in range(w * h * 3))
    ppm = b"P6 5 4 255\n" + pixels
    png, _, _ = virt.ppm_to_png(ppm)
    assert virt.png_size(png) == (w, h)
    back, bw, bh = virt.png_to_ppm(png)
    assert (bw, bh) == (w, h) and back == b"P6\n5 4\n255\n" + pixels


def _paeth(a: int, b: int, c: int) -> int:
    p = a + b - c
    pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
    return a if pa <= pb and pa <= pc else (b if pb <= pc else c)


@pytest.mark.parametrize("channels", [1, 3, 4])
def test_png_to_ppm_all_filters(channels: int) -> None:
    """Rows encoded with filters 0-4 (what libpng's adaptive filtering emits) decode exactly."""
    w, h = 7, 5
    rows = [bytes((x * 31 + y * 57 + c * 11) % 256 for x in range(w) for c in range(channels))
            for y in range(h)]
    stride, bpp = w * channels, channels
    raw = bytearray()
    prev = bytes(stride)
    for y, row in enumerate(rows):
        ftype = y % 5
        raw.append(ftype)
        for i in range(stride):
            a = row[i - bpp] if i >= bpp else 0
            b = prev[i]
            c = prev[i - bpp] if i >= bpp else 0
            pred = [0, a, b, (a + b) >> 1, _paeth(a, b, c)][ftype]
            raw.append((row[i] - pred) & 0xFF)
        prev = row

    def chunk(tag: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + tag + body + struct.pack(">I", zlib.crc32(tag + body))

    ctype = {1: 0, 3: 2, 4: 6}[channels]
    png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, ctype, 0, 0, 0))
           + chunk(b"IDAT", zlib.compress(bytes(raw))) + chunk(b"IEND", b""))
    ppm, _, _ = virt.png_to_ppm(png)
    want = b"".join(bytes(px for x in range(w) for px in (
        row[x * channels:x * channels + 3] if channels >= 3 else row[x:x + 1] * 3)) for row in rows)
    assert ppm == b"P6\n7 5\n255\n" + want


def test_canonical_xml_ignores_formatting() -> None:
    a = "<domain type='qemu'>\n  <name>x</name>\n</domain>"
    b = '<domain type="qemu"><name>x</name></domain>'
    assert virt.canonical_xml(a) == virt.canonical_xml(b)
    assert virt.canonical_xml(a) != virt.canonical_xml(b.replace(">x<", ">y<"))
