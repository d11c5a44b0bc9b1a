"""Host capabilities: tools.virt.host_caps fetches them (fake connection), domain.facts reads the XML."""

from __future__ import annotations

import libvirt
import pytest

from pipeline.core.errors import InputError
from pipeline.tools.virt import host_caps

CAPS = """<capabilities>
  <host><cpu><arch>x86_64</arch></cpu></host>
  <guest>
    <os_type>hvm</os_type>
    <arch name='i686'>
      <wordsize>32</wordsize>
      <emulator>/opt/qemu/bin/qemu-system-i386</emulator>
      <machine maxCpus='255'>pc-i440fx-6.2</machine>
      <machine canonical='pc-i440fx-6.2' maxCpus='255'>pc</machine>
      <machine canonical='pc-q35-6.2' maxCpus='288'>q35</machine>
      <domain type='qemu'/>
      <domain type='kvm'/>
    </arch>
  </guest>
  <guest>
    <os_type>hvm</os_type>
    <arch name='x86_64'>
      <wordsize>64</wordsize>
      <emulator>/opt/qemu/bin/qemu-system-x86_64</emulator>
      <machine maxCpus='255'>pc-i440fx-5.0</machine>
      <machine maxCpus='255'>pc-i440fx-6.2</machine>
      <machine maxCpus='288'>pc-q35-6.2</machine>
      <domain type='qemu'/>
      <domain type='kvm'><emulator>/opt/qemu/bin/qemu-kvm</emulator></domain>
    </arch>
  </guest>
  <guest>
    <os_type>xen</os_type>
    <arch name='x86_64'><emulator>/bogus</emulator><domain type='xen'/></arch>
  </guest>
</capabilities>"""

DOMCAPS = """<domainCapabilities>
  <os supported='yes'>
    <enum name='firmware'><value>efi</value></enum>
    <loader supported='yes'>
      <value>/usr/share/OVMF/OVMF_CODE_4M.secboot.fd</value>
      <value>/usr/share/OVMF/OVMF_CODE_4M.fd</value>
    </loader>
  </os>
  <devices>
    <disk supported='yes'><enum name='bus'><value>ide</value><value>sata</value></enum></disk>
    <video supported='yes'><enum name='modelType'><value>vga</value><value>cirrus</value></enum></video>
  </devices>
</domainCapabilities>"""


class FakeConn:
    def __init__(self, caps: str = CAPS, domcaps: str | None = DOMCAPS, driver: str = "QEMU") -> None:
        self.caps, self.domcaps, self.driver = caps, domcaps, driver
        self.domcaps_calls: list[tuple] = []

    def getCapabilities(self) -> str:
        return self.caps

    def getDomainCapabilities(self, emulator, arch, machine, virttype, flags=0) -> str:
        self.domcaps_calls.append((emulator, arch, machine, virttype))
        if self.domcaps is None:
            raise libvirt.libvirtError("this function is not supported by the connection driver")
        return self.domcaps

    def getType(self) -> str:
        return self.driver

    def getURI(self) -> str:
        return "qemu:///system"


def test_prefers_kvm_with_its_emulator() -> None:
    conn = FakeConn()
    h = host_caps(conn, prefer_kvm=True)
    x = h.arch("x86_64")
    assert (x.domain_type, x.emulator, x.kvm_offered) == ("kvm", "/opt/qemu/bin/qemu-kvm", True)
    assert x.machine == "pc-i440fx-6.2"  # newest i440fx when there is no 'pc' alias
    assert h.arch("i686").machine == "pc-i440fx-6.2"  # canonical of the 'pc' alias
    assert ("/opt/qemu/bin/qemu-kvm", "x86_64", "pc-i440fx-6.2", "kvm") in conn.domcaps_calls


def test_force_tcg(monkeypatch: pytest.MonkeyPatch) -> None:
    h = host_caps(FakeConn(), prefer_kvm=False)
    assert h.arch("x86_64").domain_type == "qemu"
    assert h.arch("x86_64").emulator == "/opt/qemu/bin/qemu-system-x86_64"
    # the domain model reads no environment: the caller passes not settings.force_tcg
    monkeypatch.setenv("GHO2KVM_FORCE_TCG", "1")
    assert host_caps(FakeConn()).arch("x86_64").domain_type == "kvm"


def test_uefi_loader_plain_before_secboot() -> None:
    x = host_caps(FakeConn(), prefer_kvm=False).arch("x86_64")
    assert x.uefi_loader == "/usr/share/OVMF/OVMF_CODE_4M.fd"
    assert x.disk_buses == ("ide", "sata")
    assert x.video_models == ("vga", "cirrus")


def test_no_domain_capabilities_means_no_uefi() -> None:
    x = host_caps(FakeConn(domcaps=None), prefer_kvm=False).arch("x86_64")
    assert x.uefi_loader is None and x.disk_buses == ()


def test_qemu_only_host() -> None:
    caps = CAPS.replace("<domain type='kvm'/>", "").replace(
        "<domain type='kvm'><emulator>/opt/qemu/bin/qemu-kvm</emulator></domain>", "")
    h = host_caps(FakeConn(caps=caps), prefer_kvm=True)
    assert {a.domain_type for a in h.arches} == {"qemu"}
    assert not any(a.kvm_offered for a in h.arches)


def test_no_hvm_guest_is_input_error() -> None:
    caps = "<capabilities><host/></capabilities>"
    with pytest.raises(InputError, match="neither kvm nor qemu"):
        host_caps(FakeConn(caps=caps))


def test_real_test_driver(test_conn) -> None:
    h = host_caps(test_conn)
    x = h.arch("x86_64")
    assert (h.driver.lower(), x.domain_type, x.machine) == ("test", "qemu", "pc")
    assert x.uefi_loader is None
    assert h.to_dict()["arches"][0]["arch"] in ("x86_64", "i686")



def test_domain_model_reads_xml_without_libvirt() -> None:
    """pipeline.domain is pure: the same facts from the XML alone, no connection, no libvirt binding."""
    import subprocess
    import sys

    code = ("import sys; from pipeline.domain import host_caps_from_xml; "
            "print('libvirt' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True).stdout.strip() == "False"
    from pipeline.domain import host_caps_from_xml

    h = host_caps_from_xml(CAPS, uri="qemu:///system", driver="QEMU", domain_caps=lambda *a: DOMCAPS,
                           prefer_kvm=True)
    assert h == host_caps(FakeConn(), prefer_kvm=True)
    none = host_caps_from_xml(CAPS, uri="u", driver="QEMU", domain_caps=lambda *a: None, prefer_kvm=False)
    assert none.arch("x86_64").uefi_loader is None
