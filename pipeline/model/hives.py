"""What inspect found about one hive file (the rules that examine it: :mod:`pipeline.registry.hivefile`)."""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.core.receipts import JsonRecord

REPAIR_HINT = "repair it in Windows (chkdsk, System Restore) or migrate with registry: []"


@dataclass(frozen=True)
class HiveFacts(JsonRecord):
    """What inspect found about one hive (``hives`` of InspectFacts, ``hives.<name>`` of the
    registry-merge receipt)."""

    name: str
    guest_path: str = ""
    size: int = 0
    version: str | None = None
    primary_seq: int | None = None
    secondary_seq: int | None = None
    checksum_ok: bool | None = None
    dirty: bool = False
    logs_found: tuple[str, ...] = ()
    entries_replayed: int = 0
    replayed_seqs: tuple[int, ...] = ()  # first and last sequence number replayed
    values_recovered: int = 0
    replay_stopped: str | None = None
    damaged: str | None = None  # what is wrong, one phrase (None: the hive is sound)
    warning: str | None = None

    def damage_line(self, image_id: str) -> str:
        return f"image '{image_id}': {self.name} hive is damaged: {self.damaged}; {REPAIR_HINT}"
