"""pipeline.tools.virt against the in-process libvirt test driver (test:///default): fast."""

from __future__ import annotations

import dataclasses

import libvirt
import pytest

from pipeline.core.errors import InputError, TransientError
from pipeline.domain import DomainSpec, build_domain, render
from pipeline.tools import bootcheck, virt

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
    """The test driver's screen is a grey picture (1120x832): a graphics screen with content."""
    disk = tmp_path / "disk.raw"
    disk.write_bytes(bytes(1024 * 1024))
    virt.define(URI, _xml(host, disk_path=str(disk)))
    fast = {"desktop": 0.3}
    r = bootcheck.boot_check(URI, "gho-xp", 5, tmp_path / "shot.png", image_id="gho-xp", poll=0.1,
                             settle=fast)
    assert (r["verdict"], r["mode"], r["ok"], r["kept_running"]) == ("desktop", "graphics", True, False)
    assert r["seconds_to_verdict"] < 5 and r["screenshot"] == str(tmp_path / "shot.png")
    assert (tmp_path / "shot.png").read_bytes().startswith(b"\x89PNG")
    assert not test_conn.lookupByName("gho-xp").isActive()
    r = bootcheck.boot_check(URI, "gho-xp", 5, tmp_path / "shot2.png", keep_running=True, poll=0.1,
                             settle=fast)
    assert r["kept_running"] and test_conn.lookupByName("gho-xp").isActive()
    with pytest.raises(InputError, match="already running"):
        bootcheck.boot_check(URI, "gho-xp", 0.1, tmp_path / "shot3.png")
    test_conn.lookupByName("gho-xp").destroy()
    # a desktop where a prompt was expected fails, and the guest is not left running
    with pytest.raises(virt.BootCheckError, match="expected prompt, the guest shows desktop") as exc:
        bootcheck.boot_check(URI, "gho-xp", 5, tmp_path / "shot4.png", keep_running=True, expect="prompt",
                             poll=0.1, settle=fast)
    assert exc.value.details["boot_check"]["verdict"] == "desktop"
    assert not test_conn.lookupByName("gho-xp").isActive()
    with pytest.raises(InputError, match="no domain named"):
        bootcheck.boot_check(URI, "nope", 0.1, tmp_path / "x.png")
    # the guest ran on throwaway overlays: the disk is untouched, no overlay is left behind
    assert disk.read_bytes() == bytes(1024 * 1024)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["disk.raw", "shot.png", "shot2.png", "shot4.png"]


def test_start_domain(test_conn, host) -> None:
    virt.define(URI, _xml(host))
    r = virt.start_domain(URI, "gho-xp")
    assert r["kept_running"] and test_conn.lookupByName("gho-xp").isActive()


def test_canonical_xml_ignores_formatting() -> None:
    a = "<domain type='qemu'>\n  <name>x</name>\n</domain>"
    b = '<domain type="qemu"><name>x</name></domain>'
    assert virt.canonical_xml(a) == virt.canonical_xml(b)
    assert virt.canonical_xml(a) != virt.canonical_xml(b.replace(">x<", ">y<"))


def test_capabilities_read_once_per_uri_per_run(test_conn, monkeypatch: pytest.MonkeyPatch) -> None:
    """Inside a run (the CLI's migrate), every image's xml-render after the first replays the host and domain
    capabilities the first one read (also in luigi's forked workers: the cache is a run folder); the XML it
    renders is the same; outside a run every call asks libvirt."""
    opened = []
    real_open = libvirt.open

    def counting_open(uri: str):
        opened.append(uri)
        return real_open(uri)

    monkeypatch.setattr(libvirt, "open", counting_open)
    live = virt.host_caps_for_uri(URI, prefer_kvm=False)
    assert len(opened) == 1
    with virt.caps_once_per_run():
        first = virt.host_caps_for_uri(URI, prefer_kvm=False)
        for _ in range(5):
            again = virt.host_caps_for_uri(URI, prefer_kvm=False)
            assert render(build_domain(SPEC, again)) == render(build_domain(SPEC, live))
        assert again == first
    assert len(opened) == 2  # one outside the run, one for the whole run
    virt.host_caps_for_uri(URI, prefer_kvm=False)
    assert len(opened) == 3
