"""The HTML report renders in a real browser straight from disk (no server): headless Chromium
takes a screenshot, which must be a non-trivial picture. Runs where Chromium is installed."""

import shutil
import subprocess

import pytest

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


@pytest.mark.skipif(CHROMIUM is None, reason="no Chromium on this machine")
def test_report_renders_in_headless_browser(tmp_path):
    from PIL import Image
    from test_report import _build_example_report

    out = _build_example_report(tmp_path)
    shot = tmp_path / "shot.png"
    subprocess.run(
        [
            CHROMIUM,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={tmp_path / 'profile'}",
            "--window-size=1200,2400",
            f"--screenshot={shot}",
            (out / "index.html").as_uri(),
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )
    img = Image.open(shot).convert("L")
    assert img.size == (1200, 2400)
    # The page drew tables and figures: many distinct grey levels, far from a blank page.
    hist = img.histogram()
    assert sum(1 for h in hist if h) > 50
    assert hist[255] < 0.97 * img.size[0] * img.size[1]
