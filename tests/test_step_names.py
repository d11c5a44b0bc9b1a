"""One list of step names (``pipeline.core.choices.Step``): every step name written in the code is one
of them, tasks and step modules use them, so an error can only name a step the summary knows."""

from __future__ import annotations

import re
from pathlib import Path

from pipeline.core.choices import Step, values
from pipeline.tasks import chain

PIPELINE = Path(__file__).parent.parent / "pipeline"
#: names that are not pipeline steps on purpose: building demo/test disks, the end-of-run clean-up,
#: the stand-alone ``gho extract`` command, undefining a domain (tests, outside any run), resolving a
#: ``.vmx``/``.ovf`` source into an image (config loading, before any step: pipeline.steps.vm_source)
NOT_STEPS = {"fakedisk", "cleanup", "gho extract", "undefine", "source"}
LITERAL = re.compile(r'(?:\bstep\s*(?:=|:\s*str\s*=)\s*|\bSTEP\s*=\s*)"([^"]+)"')


def test_every_step_literal_is_a_step() -> None:
    found = {}
    for path in PIPELINE.rglob("*.py"):
        for m in LITERAL.finditer(path.read_text(encoding="utf-8")):
            found.setdefault(m.group(1), []).append(path.relative_to(PIPELINE).as_posix())
    unknown = {name: where for name, where in found.items()
               if name not in values(Step) and name not in NOT_STEPS}
    assert unknown == {}


def test_the_chain_is_the_step_list(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"images:\n  - id: a\n    source: {tmp_path / 'a.gho'}\n", encoding="utf-8")
    (tmp_path / "a.gho").write_bytes(b"")
    assert [t.step for t in chain(str(cfg), "a")] == list(values(Step))
