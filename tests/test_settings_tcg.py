"""settings.force_tcg (YAML) and GHO2KVM_FORCE_TCG reach every consumer alike: libguestfs and host caps."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.tasks import steps
from pipeline.tools import virt
from tests.support.fx_pipeline import make_config
from tests.support.fx_receipts import write_chain


def _xml_render(tmp: Path, settings: dict[str, object] | None) -> steps.XmlRender:
    src = tmp / "d.raw"
    src.write_bytes(b"\0" * 512)
    cfg = make_config(tmp, [{"id": "a", "source": src}], settings=settings)
    write_chain(cfg, "a", until="convert")  # the facts xml-render reads
    return steps.XmlRender(config_path=str(cfg), image_id="a")


@pytest.mark.parametrize(("settings", "env", "want"), [
    ({"force_tcg": True}, "", True),
    (None, "1", True),
    (None, "yes", True),
    ({"force_tcg": False}, "", False),
    (None, "", False),
])
def test_force_tcg_from_yaml_or_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                    settings: dict[str, object] | None, env: str, want: bool) -> None:
    monkeypatch.setenv("GHO2KVM_FORCE_TCG", env)
    task = _xml_render(tmp_path, settings)
    assert task.force_tcg is want
    assert task.fingerprint()["force_tcg"] is want


def test_yaml_force_tcg_reaches_host_caps(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The bug of issue 15: the YAML setting never reached host capabilities (only the env did)."""
    monkeypatch.delenv("GHO2KVM_FORCE_TCG", raising=False)
    seen: dict[str, object] = {}
    real = virt.host_caps_for_uri

    def spy(uri: str, *, prefer_kvm: bool | None = None, image_id: str | None = None) -> object:
        seen["prefer_kvm"] = prefer_kvm
        return real(uri, prefer_kvm=prefer_kvm, image_id=image_id)

    monkeypatch.setattr(virt, "host_caps_for_uri", spy)
    task = _xml_render(tmp_path, {"force_tcg": True})
    task.execute()  # a plain domain for test:///default
    assert seen["prefer_kvm"] is False
