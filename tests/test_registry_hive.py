"""Empty hive writer + hivexregedit merge/export round trip (needs hivex tools, no libguestfs)."""

from __future__ import annotations

import shutil
import struct
import subprocess

import pytest

from pipeline.core.errors import ToolError
from pipeline.registry.hive import apply_reg, empty_hive_bytes, export, export_text, write_empty_hive
from pipeline.registry.regfile import RegType, parse_text, to_reg_text

pytestmark = pytest.mark.skipif(shutil.which("hivexregedit") is None, reason="hivexregedit not installed")

SYS = r"HKEY_LOCAL_MACHINE\SYSTEM"


def test_base_block_layout():
    data = empty_hive_bytes("SYSTEM", timestamp=0)
    assert len(data) == 8192
    assert data[:4] == b"regf" and data[4096:4100] == b"hbin"
    seq1, seq2 = struct.unpack_from("<II", data, 4)
    assert seq1 == seq2
    assert struct.unpack_from("<II", data, 0x14) == (1, 3)
    root = struct.unpack_from("<I", data, 0x24)[0]
    assert data[4096 + root + 4:4096 + root + 6] == b"nk"
    x = 0
    for (d,) in struct.iter_unpack("<I", data[:0x1FC]):
        x ^= d
    assert struct.unpack_from("<I", data, 0x1FC)[0] == x
    # cells fill the bin exactly
    off = 0x20
    while off < 4096:
        size = abs(struct.unpack_from("<i", data, 4096 + off)[0])
        assert size and size % 8 == 0
        off += size
    assert off == 4096


@pytest.mark.parametrize("minor", [3, 5])
def test_hivexsh_accepts_and_edits(tmp_path, minor):
    h = write_empty_hive(tmp_path / "h", "SOFTWARE", minor_version=minor)
    script = "add Foo\ncd Foo\nsetval 1\nBar\nstring:hi\nadd Sub\ncommit\n"
    subprocess.run(["hivexsh", "-w", str(h)], input=script, text=True, check=True)
    out = subprocess.run(["hivexsh", str(h)], input="cd Foo\nlsval\nls\n", text=True,
                         capture_output=True, check=True).stdout
    assert '"Bar"="hi"' in out and "Sub" in out
    xml = subprocess.run(["hivexml", str(h)], capture_output=True, text=True, check=True).stdout
    assert 'name="SOFTWARE" root="1"' in xml


ALL_TYPES = r'''Windows Registry Editor Version 5.00

[HKEY_LOCAL_MACHINE\SYSTEM\A]
"s"="h\u00e9 \"quoted\" C:\\path\\"
@="default"
"d"=dword:0000001f
"b"=hex:01,02,ff
"e"=hex(2):25,00,53,00,79,00,73,00,00,00
"m"=hex(7):61,00,00,00,62,00,00,00,00,00
"q"=hex(b):01,02,03,04,05,06,07,08
"n"=hex(0):
"be"=hex(5):00,00,00,01
"x"=hex(a):01,\
  02

[HKEY_LOCAL_MACHINE\SYSTEM\A\B]
"in b"=dword:ffffffff
'''.replace(r"\u00e9", "\u00e9")


def _values(ops):
    return {(o.key, o.name): (o.type, o.data) for o in ops if not o.is_key}


def test_merge_export_round_trip_all_types(tmp_path):
    h = write_empty_hive(tmp_path / "system", "SYSTEM")
    ops = parse_text(ALL_TYPES)
    apply_reg(h, to_reg_text(ops), SYS)
    back = export(h, r"\A", prefix=SYS)
    assert _values(back) == _values(ops)
    assert {o.key for o in back if o.is_key} == {SYS + r"\A", SYS + r"\A\B"}
    vals = {o.name: o.value for o in back if not o.is_key}
    assert vals["s"] == 'h\u00e9 "quoted" C:\\path\\'
    assert vals["m"] == ["a", "b"]
    assert vals["q"] == 0x0807060504030201
    assert vals["be"] == 1
    assert dict((o.name, o.type) for o in back if not o.is_key)["e"] == RegType.EXPAND_SZ


def test_export_without_prefix_and_root(tmp_path):
    h = write_empty_hive(tmp_path / "software", "SOFTWARE")
    apply_reg(h, "Windows Registry Editor Version 5.00\n\n[HKEY_LOCAL_MACHINE\\SOFTWARE\\X]\n"
                 '"v"=dword:00000002\n', r"HKEY_LOCAL_MACHINE\SOFTWARE")
    ops = export(h, "\\")
    assert [o.key for o in ops if o.is_key] == ["\\", r"\X"]
    assert [(o.key, o.name, o.value) for o in ops if not o.is_key] == [(r"\X", "v", 2)]


def test_merge_into_missing_parent_fails_and_export_missing_key_fails(tmp_path):
    h = write_empty_hive(tmp_path / "system", "SYSTEM")
    with pytest.raises(ToolError) as e:
        apply_reg(h, "Windows Registry Editor Version 5.00\n\n[HKEY_LOCAL_MACHINE\\SYSTEM\\A\\B]\n",
                  SYS, image_id="img1")
    assert "img1" in str(e.value) and "registry-merge" in str(e.value)
    with pytest.raises(ToolError):
        export_text(h, r"\Nope")
