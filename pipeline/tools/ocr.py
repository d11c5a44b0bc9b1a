"""tesseract-ocr: the text of a graphics-mode screenshot (a Windows stop screen), best effort.

Optional: without ``tesseract`` on PATH, or when it fails or times out, :func:`read_text` returns
None and the boot check reports a stop screen without its code. Only the stop code's *name* and a
``STOP: 0x...`` token are used from the result (:func:`pipeline.tools.screen.with_ocr`).
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from PIL import Image

from pipeline.core.choices import Step
from pipeline.core.errors import ToolError
from pipeline.tools.run import run

TESSERACT = "tesseract"


def available() -> bool:
    return shutil.which(TESSERACT) is not None


def read_text(img: Image.Image, *, image_id: str | None = None, timeout: float = 60) -> str | None:
    """The text tesseract reads on ``img``; None when tesseract is missing or fails."""
    if not available():
        return None
    with tempfile.TemporaryDirectory(prefix="gho2kvm-ocr-") as tmp:
        path = Path(tmp) / "screen.png"
        img.convert("RGB").save(path, format="PNG")
        try:
            r = run([TESSERACT, str(path), "stdout"], step=Step.DEFINE, image_id=image_id, timeout=timeout)
        except ToolError:
            return None
    return r.stdout
