"""``report.html`` as people see it: rendered by a real headless Chromium (Debian's ``chromium``).

Twelve images with receipts as a migration leaves them (stand-in results, real timestamps, bytes,
boot-check verdicts with screenshots; one image failed in convert, one never ran). The page is loaded
with ``--dump-dom`` after its scripts ran, so what is checked is the browser's DOM: one timeline row
per image, one bar per step that ran with its status colour, every thumbnail decoded by the browser
(``naturalWidth`` > 0, written into the DOM by a small probe script added to a copy of the page), and the
totals. ``--screenshot`` then renders the page to a PNG, which must not be blank.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from PIL import Image, ImageDraw

from pipeline.app.report import STATUS_COLOURS, write_report
from pipeline.core import atomic, receipts
from pipeline.core.config import load_config
from pipeline.tasks import chain
from tests.support.fx_pipeline import make_config
from tests.support.fx_receipts import XP_FACTS, stand_in

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (scripts/setup-system.sh)")
N = 12
T0 = datetime(2026, 12, 1, 9, 0, tzinfo=UTC)
STEPS = ("inspect", "registry-merge", "convert", "xml-render", "define")
SECONDS = {"inspect": 40.0, "registry-merge": 6.0, "convert": 20.0, "xml-render": 0.1}


def chromium(*args: str, tmp: Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    assert CHROMIUM is not None
    profile = tmp / f"profile-{len(list(tmp.glob('profile-*')))}"
    argv = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            "--disable-dev-shm-usage", f"--user-data-dir={profile}", *args]
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                          env=dict(os.environ, HOME=str(tmp)))


def screenshot_png(path: Path, k: int) -> Path:
    img = Image.new("RGB", (720, 400), (0, 0, 0))
    ImageDraw.Draw(img).text((10, 10 + 20 * (k % 10)), f"C:\\> image {k}", fill=(200, 200, 200))
    img.save(path)
    return path


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("report")
    src = tmp / "d.raw"
    src.write_bytes(b"\0" * 4096)
    ids = [f"xp{k:02d}" for k in range(N)]
    cfg_path = make_config(tmp, [{"id": i, "source": src} for i in ids])
    for k, image_id in enumerate(ids):
        if k == N - 1:
            continue  # never ran
        t = T0 + timedelta(minutes=4 * (k // 2))  # two at a time
        for task in chain(str(cfg_path), image_id):
            task.image.image_dir.mkdir(parents=True, exist_ok=True)
            secs = SECONDS.get(task.step, 1.0)
            start, end = t.isoformat(), (t + timedelta(seconds=secs)).isoformat()
            if k == 3 and task.step == "convert":
                atomic.write_json(task.error_path, {"step": task.step, "image_id": image_id,
                                                    "started": start, "finished": end, "duration_s": secs,
                                                    "error": "disk full"})
                break
            result = stand_in(task, XP_FACTS)
            fp = task.fingerprint()
            if task.step == "inspect":
                fp = task.fingerprint_after(fp, receipts.Outcome(result))
            doc = receipts.Receipt(step=task.step, image_id=image_id, run_id=receipts.new_run_id(),
                                   started=start, finished=end, duration_s=secs, fingerprint=fp, outputs={},
                                   bytes_read=64 << 20, bytes_written=32 << 20, result=result).to_dict()
            if task.step == "define":
                shot = screenshot_png(task.image.image_dir / "boot.png", k)
                doc["result"]["boot_check"] = {"verdict": "prompt", "seconds_to_verdict": 20 + k,
                                               "screenshot": str(shot), "ok": True}
            receipts.write(task.receipt_path, doc)
            t += timedelta(seconds=secs)
    _md, html_path = write_report(load_config(cfg_path))
    return html_path


def probed_dom(html_path: Path, tmp: Path) -> str:
    """The DOM after load, with each thumbnail's decoded width written into it by a probe script."""
    probe = ("<script>window.addEventListener('load',()=>{for(const i of document.images)"
             "{i.setAttribute('data-loaded-width',String(i.naturalWidth));}"
             "document.body.setAttribute('data-probe','ran');});</script>")
    page = tmp / "probe.html"
    page.write_text(html_path.read_text().replace("</body>", probe + "</body>"))
    r = chromium("--virtual-time-budget=5000", "--dump-dom", page.as_uri(), tmp=tmp)
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout


def test_report_renders_in_chromium(report: Path, tmp_path: Path) -> None:
    dom = probed_dom(report, tmp_path)
    assert "data-probe=\"ran\"" in dom, "the page did not finish loading"
    rows = re.findall(r'<g class="tl-row" data-image="([^"]+)">(.*?)</g>', dom, re.S)
    assert [r[0] for r in rows] == [f"xp{k:02d}" for k in range(N)], "one timeline row per image, in order"
    bars = {image: re.findall(r'<rect class="bar ([\w-]+)" data-step="([\w-]+)"[^>]*fill="([^"]+)"', body)
            for image, body in rows}
    assert [s for _c, s, _f in bars["xp00"]] == list(STEPS)
    assert all(c == "done" and f == STATUS_COLOURS["done"] for c, _s, f in bars["xp00"])
    assert bars["xp03"][-1][:2] == ("failed", "convert") and bars["xp03"][-1][2] == STATUS_COLOURS["failed"]
    assert bars[f"xp{N - 1:02d}"] == [], "an image that never ran has a row and no bar"
    # bars of two images started together overlap in x; later pairs are to the right
    xs = {image: float(m.group(1)) for image, body in rows
          if (m := re.search(r'<rect[^>]* x="([\d.]+)"', body))}
    assert xs["xp00"] == xs["xp01"] < xs["xp02"] == xs["xp03"] < xs["xp04"]
    widths = [int(w) for w in re.findall(r'<img class="shot"[^>]*data-loaded-width="(\d+)"', dom)]
    assert len(widths) == N - 2 and all(w > 0 for w in widths), "every boot screenshot decodes in the browser"
    assert "10 of 12 image(s) done" in dom and "images/hour" in dom
    assert "prompt after 20 s" in dom


def test_report_screenshot_is_not_blank(report: Path, tmp_path: Path) -> None:
    out = tmp_path / "report.png"
    r = chromium(f"--screenshot={out}", "--window-size=1100,1400", "--hide-scrollbars", report.as_uri(),
                 tmp=tmp_path)
    assert r.returncode == 0 and out.is_file(), r.stderr[-2000:]
    with Image.open(out) as img:
        colours = img.convert("RGB").getcolors(1 << 20) or []
    assert len(colours) > 20, "the rendered page has text, bars and thumbnails"
    assert any(c[1] == (0x3A, 0x9D, 0x3A) for c in colours), "the green 'done' bars are drawn"
    if os.environ.get("GHO2KVM_REPORT_PNG"):  # docs/report.png is made this way
        shutil.copy(out, os.environ["GHO2KVM_REPORT_PNG"])


def test_report_is_self_contained(report: Path) -> None:
    page = report.read_text()
    assert not re.search(r"<(script|link)\b|https?://", page), "nothing external: the page works offline"
    assert page.count("src='data:image/png;base64,") == N - 2


def test_report_md_has_totals(report: Path) -> None:
    md = report.with_suffix(".md").read_text()
    assert "Totals: 10 of 12 image(s) done" in md and "## Time per step" in md
    assert re.search(r"^\| inspect \| 11 \| 440.0 \| 40.0 \|", md, re.M)
