"""Receipts and staleness: what makes a step complete, stale or incomplete (no appliance, no tools).

Two toy steps on the real base task (pipeline/tasks/base.py) and the real receipt code
(pipeline/core/receipts.py): ``ToyCopy`` copies the image's source to an artifact, ``ToyLabel`` (after
``ToyCopy``) writes a file from a config field. A run is ``task.run()``, as a Luigi worker calls it.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from pipeline.core import receipts
from pipeline.core.receipts import NAMED, JsonRecord, Outcome
from pipeline.tasks.base import ImageTask
from tests.support.fx_pipeline import make_config


@dataclass(frozen=True)
class CopyInput:
    source: Path
    image_dir: Path = field(metadata=NAMED)


@dataclass(frozen=True)
class LabelInput:
    memory_mib: int | None
    image_dir: Path = field(metadata=NAMED)


@dataclass(frozen=True)
class Done(JsonRecord):
    copied: bool = False

    @property
    def warnings(self) -> tuple[str, ...]:
        return ()


class ToyCopy(ImageTask[Done]):
    step = "toy-copy"
    result_type = Done

    def step_input(self) -> CopyInput:
        return CopyInput(source=Path(self.image.source), image_dir=self.image.image_dir)

    def execute(self) -> Outcome[Done]:
        out = self.image.image_dir / "copy.bin"
        out.write_bytes(Path(self.image.source).read_bytes())
        return Outcome(Done(copied=True), outputs={"copy": out})


class ToyLabel(ImageTask[Done]):
    step = "toy-label"
    result_type = Done

    def upstream(self) -> ImageTask[Done]:
        return ToyCopy(config_path=self.config_path, image_id=self.image_id)

    def step_input(self) -> LabelInput:
        return LabelInput(memory_mib=self.image.memory_mib, image_dir=self.image.image_dir)

    def execute(self) -> Outcome[Done]:
        out = self.image.image_dir / "label.txt"
        out.write_text(f"{self.image.id} {self.image.memory_mib}\n")
        return Outcome(Done(), outputs={"label": out})


def chain(config: Path) -> tuple[ToyCopy, ToyLabel]:
    return ToyCopy(config_path=str(config), image_id="toy"), ToyLabel(config_path=str(config), image_id="toy")


def run_all(*tasks: ImageTask) -> None:
    for t in tasks:
        t.run()


@pytest.fixture
def config(tmp_path: Path) -> Path:
    (tmp_path / "toy.raw").write_bytes(bytes(4096))
    return make_config(tmp_path, [{"id": "toy", "source": tmp_path / "toy.raw", "memory_mib": 512}])


def rewrite_config(config: Path, memory_mib: int) -> None:
    text = config.read_text().replace("memory_mib: 512", f"memory_mib: {memory_mib}")
    config.write_text(text)
    st = config.stat()  # a new mtime even on a coarse clock: the config is loaded once per version
    os.utime(config, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))


# ------------------------------------------------------------------------------ the chain


def test_never_run_is_incomplete_with_a_reason(config: Path) -> None:
    copy, label = chain(config)
    assert not copy.complete() and not label.complete()
    assert copy.stale_reason() == "no receipt (never ran, or did not finish)"
    assert label.stale_reason() == "toy-copy: no receipt (never ran, or did not finish)"


def test_unchanged_inputs_are_complete(config: Path) -> None:
    copy, label = chain(config)
    run_all(copy, label)
    assert copy.complete() and label.complete()
    assert copy.stale_reason() is None and label.stale_reason() is None
    r = label.receipt()
    assert r is not None and r["step"] == "toy-label" and r["image_id"] == "toy"
    assert r["fingerprint"]["upstream_run_id"] == copy.receipt()["run_id"]  # type: ignore[index]
    # fresh task objects (another process, another worker) agree
    assert all(t.complete() for t in chain(config))


def test_changed_source_makes_the_chain_stale(config: Path, tmp_path: Path) -> None:
    copy, label = chain(config)
    run_all(copy, label)
    src = tmp_path / "toy.raw"
    st = src.stat()
    os.utime(src, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))
    why = copy.stale_reason()
    assert why is not None and why.startswith("input changed: source") and "modified (mtime)" in why
    assert not copy.complete()
    assert label.stale_reason() == f"toy-copy: {why}"  # a step is stale when a step before it is
    run_all(copy, label)
    assert copy.complete() and label.complete()


def test_changed_config_field_makes_only_its_step_stale(config: Path) -> None:
    copy, label = chain(config)
    run_all(copy, label)
    rewrite_config(config, 1024)
    copy, label = chain(config)
    assert copy.complete()
    assert label.stale_reason() == "input changed: memory_mib 512 → 1024"
    run_all(label)
    assert label.complete()
    assert (config.parent / "work" / "toy" / "label.txt").read_text() == "toy 1024\n"


def test_upstream_run_again_makes_the_next_step_stale(config: Path) -> None:
    copy, label = chain(config)
    run_all(copy, label)
    first = copy.receipt()["run_id"]  # type: ignore[index]
    copy.receipt_path.unlink()  # e.g. removed by hand: the step runs again with the same inputs
    run_all(copy)
    assert copy.complete() and copy.receipt()["run_id"] != first  # type: ignore[index]
    assert label.stale_reason() == "input changed: the previous step ran again (upstream_run_id)"
    assert not label.complete()


def test_changed_or_missing_output_is_stale(config: Path) -> None:
    copy, label = chain(config)
    run_all(copy, label)
    out = config.parent / "work" / "toy" / "label.txt"
    out.write_text("edited by hand, longer than before\n")
    assert label.stale_reason() == f"output changed: {out}"
    out.unlink()
    assert label.stale_reason() == f"output missing: {out}"
    assert copy.complete()


@pytest.mark.parametrize("content", [
    b"",                                     # killed before anything was written
    b'{"step": "toy-label", "fingerprint": {',  # partial
    b"\x00\xff\xfe garbage",                 # not text
    b"[1, 2, 3]",                            # JSON, not an object
    b'{"step": "toy-label"}',                # no fingerprint
    b'{"fingerprint": "not a dict"}',
])
def test_corrupt_or_partial_receipt_is_incomplete_without_exception(config: Path, content: bytes) -> None:
    copy, label = chain(config)
    run_all(copy, label)
    label.receipt_path.write_bytes(content)
    assert label.complete() is False
    why = label.stale_reason()
    assert why in ("no receipt (never ran, or did not finish)", "receipt has no fingerprint",
                   "receipt of an older version (result unreadable)")
    assert copy.complete()  # the step before is not affected
    run_all(label)
    assert label.complete()


def test_receipt_that_is_a_directory_is_incomplete(config: Path) -> None:
    copy, label = chain(config)
    run_all(copy)
    label.receipt_path.mkdir(parents=True)
    assert label.complete() is False


def test_unreadable_config_is_incomplete_without_exception(config: Path) -> None:
    copy, label = chain(config)
    run_all(copy, label)
    config.unlink()
    assert copy.complete() is False and label.complete() is False


def test_failed_step_writes_an_error_record_and_no_receipt(config: Path) -> None:
    class Broken(ToyCopy):
        step = "toy-broken"

        def execute(self) -> dict[str, Any]:
            raise OSError("no space left on device")

    t = Broken(config_path=str(config), image_id="toy")
    with pytest.raises(OSError):
        t.run()
    assert t.receipt() is None and not t.complete()
    record = json.loads(t.error_path.read_text())
    assert record["step"] == "toy-broken" and record["error"] == "no space left on device"


# ------------------------------------------------------------------------------ receipts module


def test_why_stale_names_each_kind_of_change(tmp_path: Path) -> None:
    f = tmp_path / "a.reg"
    f.write_text("x")
    old = {"reg": receipts.content_hash(f), "disk": receipts.file_stamp(f), "n": 1, "upstream_run_id": "a"}
    receipt = {"fingerprint": old, "outputs": {}}
    assert receipts.why_stale(receipt, dict(old)) is None
    assert receipts.why_stale(None, old) == "no receipt (never ran, or did not finish)"
    f.write_text("yy")
    new = {"reg": receipts.content_hash(f), "disk": receipts.file_stamp(f), "n": 2, "upstream_run_id": "b"}
    why = receipts.why_stale(receipt, new)
    assert why is not None and why.startswith("input changed: ")
    assert f"disk {f} modified (size" in why and f"reg {f} modified (content)" in why
    assert why.endswith("(+1 more)")
    f.unlink()
    assert receipts.describe_change("reg", old["reg"], receipts.content_hash(f)) == f"reg {f} is missing"
    assert receipts.describe_change("n", 1, 2) == "n 1 → 2"
    assert receipts.describe_change("d", {"a": {"b": 1}}, {"a": {"b": 2}}) == "d.a.b 1 → 2"
    assert receipts.describe_change("l", [1, 2], [1, 3]) == "l[1] 2 → 3"
    assert receipts.describe_change("l", [1], [1, 3]) == "l: 1 → 2 entries"


def test_stamps_read_no_content_and_never_raise(tmp_path: Path) -> None:
    assert receipts.file_stamp(tmp_path / "none") == {"path": str(tmp_path / "none"), "missing": True}
    assert receipts.content_hash(tmp_path / "none")["missing"] is True
    assert receipts.content_hash(tmp_path)["missing"] is True  # a directory
    f = tmp_path / "f"
    f.write_bytes(b"abc")
    stamp = receipts.file_stamp(f)
    assert stamp["size"] == 3 and "sha256" not in stamp


@pytest.mark.parametrize("outputs", [
    {"x": "not a dict"}, {"x": {"no": "path"}}, {"x": {"path": None}}, {"x": {"path": 7}},
])
def test_odd_outputs_in_a_receipt_never_raise(tmp_path: Path, outputs: dict[str, Any]) -> None:
    fp = {"n": 1}
    why = receipts.why_stale({"fingerprint": fp, "outputs": outputs}, fp)
    assert why is None or why.startswith("output")


def test_digest_is_order_independent_and_run_ids_are_unique() -> None:
    assert receipts.digest({"a": 1, "b": 2}) == receipts.digest({"b": 2, "a": 1})
    assert receipts.digest({"a": 1}) != receipts.digest({"a": 2})
    assert receipts.new_run_id() != receipts.new_run_id()


def test_a_killed_runs_receipt_temp_is_removed_by_the_next_run(config: Path) -> None:
    from pipeline.core import paths

    copy, _label = chain(config)
    paths.claim_image_dir(copy.image.image_dir, copy.image.id)  # the folder of an earlier run
    left = copy.receipt_path.with_name(f".{copy.receipt_path.name}.tmp-999999")  # killed mid-write
    left.write_text('{"step": "toy-copy", "fingerp')
    assert not copy.complete()
    copy.run()
    assert copy.complete() and not left.exists()
    assert sorted(p.name for p in copy.image.image_dir.iterdir() if ".tmp-" in p.name) == []
