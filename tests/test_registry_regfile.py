"""regedit-format parser and writer (pure Python, no hivex needed)."""

from __future__ import annotations

import pytest

from pipeline.core.errors import InputError
from pipeline.registry.regfile import (
    Op,
    RegSyntaxError,
    RegType,
    encode_multi_sz,
    encode_sz,
    parse_bytes,
    parse_file,
    parse_text,
    to_reg_text,
)

WIN_FILE = (
    "Windows Registry Editor Version 5.00\r\n"
    "\r\n"
    "; a comment\r\n"
    "[HKEY_LOCAL_MACHINE\\SYSTEM\\CurrentControlSet\\Services\\New\\Deep\\Key]\r\n"
    '"Path"="C:\\\\Program Files\\\\\\"x\\""\r\n'
    '@="d\u00e9faut"\r\n'
    '"Start"=dword:00000000\r\n'
    '"Bin"=hex:de,ad,\\\r\n'
    "  be,ef\r\n"
    "\r\n"
    "[-HKEY_LOCAL_MACHINE\\SOFTWARE\\Gone]\r\n"
)


def test_utf16le_bom_crlf_file(tmp_path):
    p = tmp_path / "win.reg"
    p.write_bytes(b"\xff\xfe" + WIN_FILE.encode("utf-16-le"))
    ops = parse_file(p)
    key = r"HKEY_LOCAL_MACHINE\SYSTEM\CurrentControlSet\Services\New\Deep\Key"
    assert ops[0] == Op(key, file=str(p), line=4)
    vals = {o.name: (o.type, o.value) for o in ops if not o.is_key}
    assert vals == {
        "Path": (RegType.SZ, 'C:\\Program Files\\"x"'),
        "": (RegType.SZ, "d\u00e9faut"),
        "Start": (RegType.DWORD, 0),
        "Bin": (RegType.BINARY, b"\xde\xad\xbe\xef"),
    }
    assert ops[-1].is_key and ops[-1].delete and ops[-1].key == r"HKEY_LOCAL_MACHINE\SOFTWARE\Gone"
    assert ops[-1].line == 11
    assert [o.line for o in ops] == [4, 5, 6, 7, 8, 11]


@pytest.mark.parametrize("encoding,bom", [("utf-8", b""), ("utf-8", b"\xef\xbb\xbf"),
                                          ("utf-16-le", b""), ("utf-16-be", b"\xfe\xff")])
def test_encodings_and_line_ends(encoding, bom):
    for text in (WIN_FILE, WIN_FILE.replace("\r\n", "\n")):
        ops = parse_bytes(bom + text.encode(encoding), "x.reg")
        assert len(ops) == 6
        assert ops[2].value == "d\u00e9faut"


def test_every_value_type():
    text = "\n".join([
        "Windows Registry Editor Version 5.00",
        r"[HKLM\SOFTWARE\T]",
        '"sz"="a b"',
        '"exp"=hex(2):25,00,53,00,79,00,73,00,74,00,65,00,6d,00,52,00,6f,00,6f,00,74,00,25,00,00,00',
        '"multi"=hex(7):6f,00,6e,00,65,00,00,00,74,00,77,00,6f,00,00,00,00,00',
        '"q"=hex(b):ff,00,00,00,00,00,00,80',
        '"none"=hex(0):',
        '"b"=hex(3):00',
        '"dbe"=hex(5):00,00,01,00',
        '"link"=hex(6):41,00',
        '"res"=hex(8):01,02',
        '"full"=hex(9):03',
        '"req"=HEX(A):04',
        '"d"=dword:1',
        '"D2"=DWORD:FFFFFFFF',
        '"x"=hex:',
        '"wide"="\u4e2d\u6587"',
        '"semi"="a;b" ; trailing comment',
        "@=hex(1):41,00,00,00",
    ])
    got = {o.name: (o.type, o.value) for o in parse_text(text) if not o.is_key}
    assert got == {
        "sz": (1, "a b"),
        "exp": (2, "%SystemRoot%"),
        "multi": (7, ["one", "two"]),
        "q": (11, 0x80000000000000FF),
        "none": (0, b""),
        "b": (3, b"\0"),
        "dbe": (5, 0x100),
        "link": (6, "A"),
        "res": (8, b"\x01\x02"),
        "full": (9, b"\x03"),
        "req": (10, b"\x04"),
        "d": (4, 1),
        "D2": (4, 0xFFFFFFFF),
        "x": (3, b""),
        "wide": (1, "\u4e2d\u6587"),
        "semi": (1, "a;b"),
        "": (1, "A"),
    }


def test_deletions():
    ops = parse_text("REGEDIT4\n\n[HKLM\\SOFTWARE\\A]\n\"v\"=-\n@=-\n\n[-HKLM\\SOFTWARE\\B\\]\n")
    assert [(o.key, o.name, o.delete) for o in ops] == [
        (r"HKLM\SOFTWARE\A", None, False),
        (r"HKLM\SOFTWARE\A", "v", True),
        (r"HKLM\SOFTWARE\A", "", True),
        (r"HKLM\SOFTWARE\B", None, True),
    ]
    assert all(o.type is None and o.data is None for o in ops)


def test_regedit4_ansi_strings_become_utf16():
    raw = b"REGEDIT4\r\n\r\n[HKLM\\SOFTWARE\\A]\r\n\"s\"=\"caf\xe9\"\r\n\"e\"=hex(2):25,41,25,00\r\n"
    ops = parse_bytes(raw, "old.reg")
    assert ops[1].data == encode_sz("caf\u00e9")
    assert ops[2].data == "%A%\0".encode("utf-16-le") and ops[2].value == "%A%"


def test_continuation_lines_in_values_and_multi_sz():
    text = ('Windows Registry Editor Version 5.00\n\n[HKLM\\SOFTWARE\\A]\n'
            '"m"=hex(7):61,00,00,00,\\\n    62,00,00,00,\\\n  00,00\n"after"=dword:00000002\n')
    ops = parse_text(text)
    assert ops[1].data == encode_multi_sz(["a", "b"]) and ops[1].line == 4
    assert ops[2].line == 7 and ops[2].value == 2


@pytest.mark.parametrize("body,line,needle", [
    ('[HKLM\\SOFTWARE\\A]\n"v"=dword:123456789\n', 4, "dword"),
    ('[HKLM\\SOFTWARE\\A]\n"v"=hex:01,zz\n', 4, "hex byte"),
    ('[HKLM\\SOFTWARE\\A]\n"v"="unterminated\n', 4, "closing double quote"),
    ('[HKLM\\SOFTWARE\\A]\n"v"="C:\\Windows"\n', 4, "escape"),
    ('[HKLM\\SOFTWARE\\A]\n"v"=wat\n', 4, "expected"),
    ('[HKLM\\SOFTWARE\\A]\n"v" dword:1\n', 4, "expected ="),
    ('"v"=dword:00000001\n', 3, "outside a key"),
    ('[HKLM\\SOFTWARE\\A\n', 3, "[KEY]"),
    ('[HKLM\\SOFTWARE\\A]\n\njunk here\n', 5, "unexpected text"),
    ('[HKLM\\SOFTWARE\\A]\n"m"=hex(7):61,00,\\\n  zz\n"ok"=-\n', 4, "hex byte"),
    ('[HKLM\\\\SOFTWARE]\n', 3, "empty path component"),
    ('[]\n', 3, "empty key"),
])
def test_malformed_lines_name_file_and_line(body, line, needle):
    text = "Windows Registry Editor Version 5.00\n\n" + body
    with pytest.raises(RegSyntaxError) as e:
        parse_text(text, "bad.reg")
    assert isinstance(e.value, InputError)
    assert e.value.line == line
    msg = str(e.value)
    assert msg.startswith(f"bad.reg:{line}: ") and needle in msg and "\n" not in msg


def test_missing_header():
    with pytest.raises(RegSyntaxError) as e:
        parse_text("\n[HKLM\\SOFTWARE\\A]\n", "nohdr.reg")
    assert e.value.line == 2 and "header" in str(e.value)
    with pytest.raises(RegSyntaxError, match="empty file"):
        parse_text("", "empty.reg")


def test_unreadable_file_is_input_error(tmp_path):
    with pytest.raises(InputError, match="cannot read"):
        parse_file(tmp_path / "missing.reg")


def test_writer_round_trip_is_byte_exact():
    ops = parse_text("\n".join([
        "Windows Registry Editor Version 5.00",
        r'[HKLM\SOFTWARE\A "quoted"]',
        r'"na\"me\\"="v\\al\"ue"',
        '@=dword:00000005',
        '"m"=hex(7):61,00,00,00,00,00',
        '"x"=-',
        r"[-HKLM\SOFTWARE\B]",
        r"[HKLM\SOFTWARE\A]",
        '"q"=hex(b):01,00,00,00,00,00,00,00',
    ]))
    text = to_reg_text(ops)
    assert not any(ln.endswith("\\") for ln in text.splitlines())
    assert "\n\n[-HKLM\\SOFTWARE\\B]\n\n" in text
    again = parse_text(text)
    strip = [(o.key, o.name, o.type, o.data, o.delete) for o in ops]
    assert [(o.key, o.name, o.type, o.data, o.delete) for o in again] == strip
    # values are written as bytes, never as bare strings (hivexregedit --encoding independent)
    assert '="' not in text


def test_writer_starts_new_section_when_a_value_name_repeats():
    ops = parse_text('Windows Registry Editor Version 5.00\n\n[HKLM\\SOFTWARE\\A]\n"v"=dword:00000001\n'
                     '"V"=-\n"w"=dword:00000002\n"v"=dword:00000003\n')
    text = to_reg_text(ops)
    assert text.count("[HKLM\\SOFTWARE\\A]") == 3
    assert [(o.name, o.value) for o in parse_text(text) if not o.is_key] == [
        ("v", 1), ("V", None), ("w", 2), ("v", 3)]
