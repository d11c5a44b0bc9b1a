"""The define step: ``domain.xml`` → a persistent libvirt domain (idempotent), then the optional
boot check (or a plain start)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.core.choices import Step
from pipeline.core.config import BootCheck
from pipeline.core.errors import TransientError
from pipeline.core.receipts import NAMED, RUNTIME, UPSTREAM
from pipeline.model.results import Defined

STEP = Step.DEFINE


@dataclass(frozen=True)
class DefineInput:
    image_id: str
    libvirt_uri: str
    domain_name: str
    image_dir: Path = field(metadata=NAMED)  # boot.png goes here
    autostart: bool = False
    boot_check: BootCheck = field(default_factory=BootCheck)
    start: bool = False
    domain_xml: Path = field(default=Path(), metadata=UPSTREAM)  # xml-render's output
    attempts: int = field(default=3, metadata=RUNTIME)  # define is retried on a transient libvirt error
    retry_delay_s: float = field(default=5.0, metadata=RUNTIME)


def define_domain(inp: DefineInput) -> Defined:
    from pipeline.tools import bootcheck, virt

    xml = inp.domain_xml.read_text(encoding="utf-8")
    uri, name = inp.libvirt_uri, inp.domain_name
    with virt.hold(uri, image_id=inp.image_id):
        for attempt in range(1, inp.attempts + 1):
            try:
                res = virt.define(uri, xml, autostart=inp.autostart, image_id=inp.image_id)
                break
            except TransientError:
                if attempt == inp.attempts:
                    raise
                time.sleep(inp.retry_delay_s * attempt)
        boot: dict[str, Any] | None = None
        started: dict[str, Any] | None = None
        screenshot: Path | None = None
        if inp.boot_check:
            shot = inp.image_dir / "boot.png"
            boot = bootcheck.boot_check(uri, name, inp.boot_check.seconds, shot, keep_running=inp.start,
                                        expect=inp.boot_check.expect, image_id=inp.image_id)
            if shot.exists():
                screenshot = shot
        elif inp.start:
            started = virt.start_domain(uri, name, image_id=inp.image_id)
    return Defined(action=res.action, name=res.name, uuid=res.uuid, uri=res.uri, autostart=res.autostart,
                   boot_check=boot, started=started, screenshot=screenshot)
