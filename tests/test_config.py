"""Config loading: defaults, overrides, paths, and one clear line per problem (fast; no tools)."""

from __future__ import annotations

import os
from pathlib import Path
from textwrap import dedent

import pytest

from pipeline.core.config import ConfigError, GhostConfig, load_config
from pipeline.core.errors import InputError


def write(folder: Path, text: str, name: str = "images.yaml") -> Path:
    path = folder / name
    path.write_text(dedent(text).lstrip("\n"), encoding="utf-8")
    return path


@pytest.fixture
def cfgdir(tmp_path: Path) -> Path:
    """A config folder with two source images next to it."""
    (tmp_path / "disks").mkdir()
    (tmp_path / "disks" / "xp.vmdk").write_bytes(b"")
    (tmp_path / "disks" / "old.GHO").write_bytes(b"")
    (tmp_path / "extra.reg").write_text("Windows Registry Editor Version 5.00\n")
    return tmp_path


def errors_of(path: Path) -> list[str]:
    with pytest.raises(ConfigError) as ei:
        load_config(path)
    return ei.value.errors


def one_error(path: Path) -> str:
    errs = errors_of(path)
    assert len(errs) == 1, errs
    return errs[0]


# ---------------------------------------------------------------------------------------------
# valid configs


def test_valid_config_defaults_and_overrides(cfgdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(cfgdir)
    path = write(cfgdir, """
        defaults:
          memory_mib: 1024
          disk_bus: sata
          ghost:
            adapter: lsilogic
        images:
          - id: xp-office
            source: disks/xp.vmdk
          - id: old_pc.2
            source: disks/old.GHO
            memory_mib: 2048
            nic_model: e1000
            registry: [mergeide, extra.reg]
            mac: 52:54:00:AB:CD:EF
            ghost:
              command: [wine64, /opt/ghost/ghost64.exe]
              vmdk_type: flat
    """)
    cfg = load_config(path)
    assert [i.id for i in cfg.images] == ["xp-office", "old_pc.2"]
    first, second = cfg.images

    # built-in defaults, then the file's defaults
    assert first.vcpus == 1
    assert first.format == "raw"
    assert first.nic_model is None  # chosen per Windows version (guest.windows.default_nic)
    assert first.registry == ("mergeide",)
    assert first.memory_mib == 1024
    assert first.disk_bus == "sata"
    assert first.ghost == GhostConfig(adapter="lsilogic")
    assert first.domain_name == "xp-office"
    # workdir/output_dir are relative to where the pipeline starts
    assert first.workdir == Path(os.path.abspath("var/work"))

    # per-image values win over defaults; defaults not overridden still apply
    assert second.memory_mib == 2048
    assert second.nic_model == "e1000"
    assert second.disk_bus == "sata"
    assert second.mac == "52:54:00:ab:cd:ef"
    assert second.registry == ("mergeide", str(cfgdir / "extra.reg"))
    # a ghost command without a backend means the exe backend; default adapter kept
    assert second.ghost.backend == "exe"
    assert second.ghost.command == ("wine64", "/opt/ghost/ghost64.exe")
    assert second.ghost.vmdk_type == "flat"
    assert second.ghost.adapter == "lsilogic"
    assert cfg.image("old_pc.2") is second
    with pytest.raises(InputError, match="no image with id 'nope'.*xp-office, old_pc.2"):
        cfg.image("nope")


def test_relative_source_is_resolved_against_the_config_folder(
        cfgdir: Path, tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    elsewhere = tmp_path_factory.mktemp("cwd")
    monkeypatch.chdir(elsewhere)
    path = write(cfgdir, """
        images:
          - id: xp
            source: disks/../disks/xp.vmdk
    """)
    (img,) = load_config(path).images
    assert img.source == cfgdir / "disks" / "xp.vmdk"
    assert img.source.is_absolute()
    # the working directory plays no part for source ...
    assert not (elsewhere / "disks").exists()
    # ... but it does for workdir/output_dir
    assert img.workdir == Path(os.path.abspath("var/work"))
    assert img.output_dir == Path(os.path.abspath("var/images"))
    assert img.final_disk == img.output_dir / "xp.raw"


def test_absolute_source_is_kept(cfgdir: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    other = tmp_path_factory.mktemp("other")
    path = write(other, f"""
        images:
          - id: xp
            source: {cfgdir / "disks" / "xp.vmdk"}
    """)
    assert load_config(path).images[0].source == cfgdir / "disks" / "xp.vmdk"


def test_missing_sources_can_be_skipped_on_request(tmp_path: Path) -> None:
    path = write(tmp_path, """
        images:
          - id: xp
            source: not-there.vmdk
    """)
    assert load_config(path, check_sources=False).images[0].source == tmp_path / "not-there.vmdk"
    assert "file not found" in one_error(path)


# ---------------------------------------------------------------------------------------------
# one line per problem: file:line, image id, field


def _img(extra: str, source: str = "disks/xp.vmdk") -> str:
    """One image 'xp1' whose source is on line 3; ``extra`` lines start at line 4."""
    body = "".join(f"    {ln}\n" for ln in dedent(extra).strip("\n").splitlines())
    return f"images:\n  - id: xp1\n    source: {source}\n{body}"


@pytest.mark.parametrize(("extra", "field", "words"), [
    pytest.param("memroy_mib: 1024", "memroy_mib", ["unknown key", "did you mean 'memory_mib'"], id="typo"),
    pytest.param("vcpus: two", "vcpus", ["expected an integer", "'two'"], id="wrong-type"),
    pytest.param("memory_mib: true", "memory_mib", ["expected an integer", "True"], id="bool-as-int"),
    pytest.param("verify: 'yes'", "verify", ["expected true or false", "'yes'"], id="wrong-type-bool"),
    pytest.param("vcpus: 0", "vcpus", ["expected 1..512", "got 0"], id="out-of-range"),
    pytest.param("disk_bus: scsi", "disk_bus", ["expected one of ide, sata, virtio", "'scsi'"], id="enum"),
    pytest.param("format: vmdk", "format", ["expected one of raw, qcow2", "'vmdk'"], id="enum-format"),
    pytest.param("network: br0", "network", ["network:NAME or bridge:NAME", "'br0'"], id="network"),
    pytest.param("mac: 00:11:22:33:44:55", "mac", ["52:54:00:xx:xx:xx"], id="mac"),
    pytest.param('mac: "52:54:00:aa:bb:cc\\n"', "mac", ["52:54:00:xx:xx:xx"], id="mac-newline"),
    pytest.param("uuid: not-a-uuid", "uuid", ["a UUID"], id="uuid"),
    pytest.param("libvirt_uri: localhost", "libvirt_uri", ["libvirt URI"], id="uri"),
    pytest.param("registry: [mergeide, tweaks.txt]", "registry", ["ending in .reg", "'tweaks.txt'"],
                 id="registry-suffix"),
    pytest.param("registry: mergeide", "registry", ["expected a list"], id="registry-not-list"),
    pytest.param("registry: [mergeide, missing.reg]", "registry", ["file not found", "missing.reg"],
                 id="registry-missing-file"),
    pytest.param("ghost: flat", "ghost", ["expected a mapping"], id="ghost-not-mapping"),
    pytest.param("ghost:\n  vmdk_typ: flat", "ghost.vmdk_typ", ["unknown key", "did you mean 'vmdk_type'"],
                 id="ghost-typo"),
    pytest.param("ghost:\n  adapter: nvme", "ghost.adapter", ["expected one of ide, lsilogic, buslogic"],
                 id="ghost-enum"),
    pytest.param("ghost:\n  timeout_s: -5", "ghost.timeout_s", ["expected 1..604800", "-5"],
                 id="ghost-range"),
    pytest.param("ghost:\n  decode_threads: 0", "ghost.decode_threads", ["expected 1..256", "0"],
                 id="ghost-decode-threads-range"),
    pytest.param("ghost:\n  decode_threads: two", "ghost.decode_threads", ["expected", "two"],
                 id="ghost-decode-threads-type"),
    pytest.param("ghost:\n  password_env: my-pass", "ghost.password_env", ["environment variable name"],
                 id="ghost-env-name"),
    pytest.param("ghost:\n  command: []", "ghost.command", ["argv list"], id="ghost-command-empty"),
    pytest.param("disk_cache: fast", "disk_cache", ["expected one of none, writethrough, writeback"],
                 id="disk-cache-enum"),
    pytest.param("disk_io: aio", "disk_io", ["expected one of native, threads, io_uring"], id="disk-io-enum"),
    pytest.param("disk_cache: writeback", "disk_io", ["disk_io 'native' needs disk_cache none or directsync",
                                                      "use disk_io threads"], id="io-native-needs-direct"),
    pytest.param("cdrom: xp.img", "cdrom", ["true (an empty drive) or a path ending in .iso"],
                 id="cdrom-suffix"),
    pytest.param("cdrom: missing.iso", "cdrom", ["file not found", "missing.iso"], id="cdrom-missing"),
    pytest.param("registry_remap_controlset: 1", "registry_remap_controlset", ["expected true or false"],
                 id="remap-bool"),
    pytest.param("virtio: virtio-win.iso", "virtio", ["expected a mapping such as {drivers: virtio-win.iso}"],
                 id="virtio-not-mapping"),
    pytest.param("virtio:\n  driver: vw", "virtio.driver", ["unknown key", "did you mean 'drivers'"],
                 id="virtio-typo"),
    pytest.param("virtio:\n  drivers: missing.iso", "virtio.drivers",
                 ["virtio-win folder or .iso", "not found"], id="virtio-missing"),
])
def test_each_problem_is_one_line_naming_file_line_image_and_field(
        cfgdir: Path, extra: str, field: str, words: list[str]) -> None:
    path = write(cfgdir, _img(extra))
    err = one_error(path)
    line = 5 if field.startswith(("ghost.", "virtio.")) else 4
    assert err.startswith(f"{path}:{line}: image 'xp1': field '{field}': "), err
    assert "\n" not in err
    for w in words:
        assert w in err, err


def test_exe_backend_needs_a_command(cfgdir: Path) -> None:
    path = write(cfgdir, _img("ghost:\n  backend: exe"))
    err = one_error(path)
    assert err.startswith(f"{path}:4: image 'xp1': field 'ghost.command': backend exe needs a command")


def test_duplicate_ids(cfgdir: Path) -> None:
    path = write(cfgdir, """
        images:
          - id: xp
            source: disks/xp.vmdk
          - id: xp
            source: disks/old.GHO
    """)
    err = one_error(path)
    assert err == f"{path}:4: image 'xp': field 'id': duplicate id (first used on line 2)"


@pytest.mark.parametrize("bad_id", ["has space", "a/b", "x" * 65, "", "ünï", "xp\n", 42])
def test_ids_outside_the_allowed_characters_are_refused(cfgdir: Path, bad_id: object) -> None:
    import json

    path = write(cfgdir, f"images:\n  - id: {json.dumps(bad_id)}\n    source: disks/xp.vmdk\n")
    err = one_error(path)
    assert err.startswith(f"{path}:2: image "), err
    assert "field 'id': expected 1-64 characters of [A-Za-z0-9._-]" in err


def test_id_of_64_characters_is_fine(cfgdir: Path) -> None:
    path = write(cfgdir, _img("").replace("xp1", "A-z.0_9" * 9 + "x"))
    assert load_config(path).images[0].id == "A-z.0_9" * 9 + "x"


def test_missing_source_file(cfgdir: Path) -> None:
    path = write(cfgdir, _img("", source="disks/nope.vmdk"))
    err = one_error(path)
    assert err == f"{path}:3: image 'xp1': field 'source': file not found: {cfgdir / 'disks' / 'nope.vmdk'}"


def test_source_of_unknown_type(cfgdir: Path) -> None:
    (cfgdir / "disk.iso").write_bytes(b"")
    err = one_error(write(cfgdir, _img("", source="disk.iso")))
    assert "field 'source': expected one of .vmdk .qcow2" in err and "'disk.iso'" in err


def test_image_without_source(cfgdir: Path) -> None:
    path = write(cfgdir, "images:\n  - id: xp1\n    memory_mib: 256\n")
    assert one_error(path) == f"{path}:2: image 'xp1': field 'source': expected a path to the source image"


def test_problems_in_defaults_and_top_level(cfgdir: Path) -> None:
    path = write(cfgdir, """
        defaults:
          vcpu: 2
          ghost:
            backend: wine
        setings: {}
        images:
          - id: xp
            source: disks/xp.vmdk
    """)
    errs = errors_of(path)
    assert errs == [
        f"{path}:5: field 'setings': unknown key (did you mean 'settings'?)",
        f"{path}:2: field 'defaults.vcpu': unknown key (did you mean 'vcpus'?)",
        f"{path}:4: field 'defaults.ghost.backend': expected one of exe, native, got 'wine'",
    ]


def test_several_errors_are_all_reported_together(cfgdir: Path) -> None:
    path = write(cfgdir, """
        images:
          - id: xp1
            source: disks/xp.vmdk
            memroy_mib: 1024
            vcpus: "2"
          - id: xp1
            source: disks/old.GHO
          - id: "bad id"
            source: disks/missing.vmdk
          - id: fine
            source: disks/xp.vmdk
            ghost:
              adapter: nvme
    """)
    with pytest.raises(ConfigError) as ei:
        load_config(path)
    errs = ei.value.errors
    assert errs == [
        f"{path}:4: image 'xp1': field 'memroy_mib': unknown key (did you mean 'memory_mib'?)",
        f"{path}:5: image 'xp1': field 'vcpus': expected an integer, got '2'",
        f"{path}:6: image 'xp1': field 'id': duplicate id (first used on line 2)",
        f"{path}:8: image 'bad id': field 'id': expected 1-64 characters of [A-Za-z0-9._-], got 'bad id'",
        f"{path}:9: image 'bad id': field 'source': file not found: {cfgdir / 'disks' / 'missing.vmdk'}",
        f"{path}:13: image 'fine': field 'ghost.adapter': expected one of ide, lsilogic, buslogic, "
        "got 'nvme'",
    ]
    # what the user sees: one problem per line, and a count in the one-line form
    assert str(ei.value) == "\n".join(errs)
    assert ei.value.message.startswith("6 config error(s): ")
    assert isinstance(ei.value, InputError)


@pytest.mark.parametrize(("text", "line", "words"), [
    ("images:\n  - id: xp\n    source: [unclosed\n", 4, "expected ',' or ']'"),
    ("images:\n  - id: xp\n\tsource: a.vmdk\n", 3, "found character '\\t'"),
    ("images: [\n", 2, "expected the node content"),
])
def test_invalid_yaml(tmp_path: Path, text: str, line: int, words: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    err = one_error(path)
    assert err.startswith(f"{path}:{line}: not valid YAML: "), err
    assert words in err


@pytest.mark.parametrize(("text", "words"), [
    ("", "expected a mapping with 'images'"),
    ("- id: xp\n", "expected a mapping with 'images'"),
    ("images: []\n", "field 'images': expected a non-empty list of images"),
    ("defaults: {}\n", "field 'images': expected a non-empty list of images"),
])
def test_document_shape(tmp_path: Path, text: str, words: str) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    err = one_error(path)
    assert err.startswith(str(path)) and words in err, err


def test_unreadable_config(tmp_path: Path) -> None:
    err = one_error(tmp_path / "missing.yaml")
    assert err == f"{tmp_path / 'missing.yaml'}: cannot read config: No such file or directory"


def test_settings(cfgdir: Path) -> None:
    path = write(cfgdir, """
        settings:
          force_tcg: true
          scheduler: central
        images:
          - id: xp
            source: disks/xp.vmdk
    """)
    cfg = load_config(path)
    assert cfg.settings.force_tcg is True
    assert cfg.settings.scheduler == "central"
    assert cfg.settings.scheduler_url == "http://127.0.0.1:8082"

    path.write_text(path.read_text().replace("central", "remote"))
    err = one_error(path)
    assert err == f"{path}:3: field 'settings.scheduler': expected one of local, central, got 'remote'"


def test_malformed_or_foreign_reg_file_is_a_config_error(tmp_path: Path) -> None:
    """.reg files are parsed when the config is loaded: file:line inside the config error line."""
    src = tmp_path / "disk.raw"
    src.write_bytes(b"\0" * 512)
    head = "Windows Registry Editor Version 5.00\n\n"
    (tmp_path / "bad.reg").write_text(head + '[HKLM\\SYSTEM\\X]\n"v"=dword:xyz\n')
    (tmp_path / "user.reg").write_text(head + '[HKEY_CURRENT_USER\\X]\n"v"="1"\n')
    cfg = tmp_path / "c.yaml"
    cfg.write_text("images:\n  - id: a\n    source: disk.raw\n    registry: [mergeide, bad.reg]\n"
                   "  - id: b\n    source: disk.raw\n    registry: [user.reg]\n")
    with pytest.raises(ConfigError) as ei:
        load_config(cfg)
    errors = ei.value.errors
    assert len(errors) == 2, errors
    assert errors[0].startswith(f"{cfg}:4: image 'a': field 'registry': ") and "bad.reg:4:" in errors[0]
    assert errors[1].startswith(f"{cfg}:7: image 'b': field 'registry': ") and "user.reg:3:" in errors[1]


# ---------------------------------------------------------------------------------------------
# boot_check: short form (seconds) or {seconds, expect}


@pytest.mark.parametrize(("text", "seconds", "expect"), [
    ("", 0, "any"),
    ("boot_check: 0", 0, "any"),
    ("boot_check: 120", 120, "any"),
    ("boot_check: {seconds: 90, expect: prompt}", 90, "prompt"),
    ("boot_check:\n  expect: desktop", 120, "desktop"),
])
def test_boot_check_forms(cfgdir: Path, text: str, seconds: int, expect: str) -> None:
    img = load_config(write(cfgdir, _img(text) if text else _img("memory_mib: 512"))).images[0]
    assert (img.boot_check.seconds, img.boot_check.expect, bool(img.boot_check)) == \
        (seconds, expect, seconds > 0)


def test_boot_check_in_defaults_is_inherited(cfgdir: Path) -> None:
    path = write(cfgdir, "defaults:\n  boot_check: {seconds: 60, expect: prompt}\n" + _img("vcpus: 1"))
    assert load_config(path).images[0].boot_check.to_dict() == {"seconds": 60, "expect": "prompt"}


@pytest.mark.parametrize(("extra", "words"), [
    ("boot_check: true", ["expected an integer", "{seconds: N, expect: any|prompt|desktop}"]),
    ("boot_check: 3601", ["expected 0..3600"]),
    ("boot_check:\n  seconds: -1", ["seconds (line 5)", "expected 0..3600"]),
    ("boot_check:\n  expect: dos", ["expect (line 5)", "expected one of any, prompt, desktop", "'dos'"]),
    ("boot_check:\n  secnds: 30", ["key 'secnds' (line 5)", "did you mean 'seconds'"]),
])
def test_boot_check_problems_are_one_line(cfgdir: Path, extra: str, words: list[str]) -> None:
    path = write(cfgdir, _img(extra))
    err = one_error(path)
    assert err.startswith(f"{path}:4: image 'xp1': field 'boot_check': "), err
    for w in words:
        assert w in err, err


def test_guest_options(cfgdir: Path) -> None:
    (cfgdir / "xp-cd.iso").write_bytes(b"\0" * 2048)
    (cfgdir / "virtio-win").mkdir()
    path = write(cfgdir, """
        defaults:
          virtio: {drivers: virtio-win}
          registry_remap_controlset: true
        images:
          - id: xp1
            source: disks/xp.vmdk
            cdrom: xp-cd.iso
            disk_cache: writeback
            disk_io: threads
          - id: xp2
            source: disks/xp.vmdk
            cdrom: true
    """)
    one, two = load_config(path).images
    assert one.cdrom == cfgdir / "xp-cd.iso" and two.cdrom is True
    assert (one.disk_cache, one.disk_io) == ("writeback", "threads")
    assert (two.disk_cache, two.disk_io) == ("none", "native")  # defaults for a real host
    assert one.virtio is not None and one.virtio.drivers == cfgdir / "virtio-win"
    assert one.registry_remap_controlset and two.registry_remap_controlset
    assert one.memory_mib is None  # by Windows version at xml-render


# ---------------------------------------------------------------------------------------------
# closed choices: every value of every enum accepted, anything else one line listing them


CHOICES = [  # (YAML text with {v}, field, enum)
    ("format: {v}", "format", "DiskFormat"),
    ("disk_bus: {v}", "disk_bus", "DiskBus"),
    ("nic_model: {v}", "nic_model", "NicModel"),
    ("disk_cache: {v}\n    disk_io: threads", "disk_cache", "DiskCache"),
    ("disk_io: {v}\n    disk_cache: none", "disk_io", "DiskIo"),
    ("ghost:\n      backend: {v}\n      command: [ghost64.exe]", "ghost.backend", "GhostBackend"),
    ("ghost:\n      path_style: {v}", "ghost.path_style", "PathStyle"),
    ("ghost:\n      vmdk_type: {v}", "ghost.vmdk_type", "VmdkType"),
    ("ghost:\n      adapter: {v}", "ghost.adapter", "Adapter"),
    ("boot_check: {{seconds: 5, expect: {v}}}", "boot_check", "BootExpect"),
]


def _image_with(cfgdir: Path, extra: str) -> Path:
    return write(cfgdir, "images:\n  - id: xp\n    source: disks/old.GHO\n    " + extra + "\n")


@pytest.mark.parametrize(("text", "field", "enum"), CHOICES, ids=[c[1] for c in CHOICES])
def test_every_closed_choice(cfgdir: Path, text: str, field: str, enum: str) -> None:
    from pipeline.core import choices

    allowed = choices.values(getattr(choices, enum))
    for v in allowed:
        img = load_config(_image_with(cfgdir, text.format(v=v))).images[0]
        obj = img.boot_check.expect if field == "boot_check" else img
        for part in field.split(".") if field != "boot_check" else ():
            obj = getattr(obj, part)
        assert obj == v and isinstance(obj, getattr(choices, enum))
    err = one_error(_image_with(cfgdir, text.format(v="bogus")))
    where = "field 'boot_check': expect (line 4): " if field == "boot_check" else f"field '{field}': "
    assert err.endswith(f"image 'xp': {where}expected one of {', '.join(allowed)}, got 'bogus'"), err


def test_settings_scheduler_choice(cfgdir: Path) -> None:
    path = write(cfgdir, "settings:\n  scheduler: elsewhere\nimages:\n  - {id: xp, source: disks/xp.vmdk}\n")
    assert one_error(path) == (f"{path}:2: field 'settings.scheduler': expected one of local, central, "
                               "got 'elsewhere'")
