"""Does an ``fnf report`` page read in a 1400-px window? Headless Chromium measures and screenshots it.

    python benchmarks/report_screenshot.py report/index.html --png report.png [--full-page report_full.png]

Prints what the browser measured as JSON (viewport width without the scroll bar, the page's scroll width,
the right edges of the tables and charts, the number of header cells, chart texts cut off at their chart's
edge) and exits 1, naming what sticks out, when the page scrolls sideways, a table, chart or image ends right
of the viewport, or an axis title or tick label does not fit its chart. Needs Chromium (Debian:
``apt-get install chromium``) or Google Chrome. ``tests/test_report.py`` runs it on a report of tiny runs and
skips without a browser.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
MEASURE = """<script>(() => {
  const view = document.documentElement, right = selector => Math.max(0, ...[...document.querySelectorAll(selector)]
    .map(element => element.getBoundingClientRect().right));
  const out = document.createElement('pre');
  out.id = 'fnf-measure';
  out.textContent = JSON.stringify({viewport: view.clientWidth, page_width: view.scrollWidth,
    page_height: view.scrollHeight, tables: document.querySelectorAll('table').length,
    header_cells: document.querySelectorAll('th').length, table_right: right('table'), chart_right: right('svg'),
    image_right: right('img'), clipped_chart_texts: [...document.querySelectorAll('svg text')].filter(text => {
      const box = text.getBoundingClientRect(), frame = text.closest('svg').getBoundingClientRect();
      return box.left < frame.left - 0.5 || box.right > frame.right + 0.5 || box.top < frame.top - 0.5
        || box.bottom > frame.bottom + 0.5; }).map(text => text.textContent)});
  document.body.appendChild(out);
})();</script>"""


def find_browser() -> str | None:
    """The first Chromium-like browser on PATH, or None."""
    return next((path for name in BROWSERS if (path := shutil.which(name))), None)


def _chromium(browser: str, width: int, height: int, *args: str) -> str:
    with tempfile.TemporaryDirectory() as profile:  # a fresh profile: runs in parallel do not share a lock
        command = [browser, "--headless", "--no-sandbox", "--disable-gpu", f"--user-data-dir={profile}",
                   f"--window-size={width},{height}", *args]
        return subprocess.run(command, capture_output=True, text=True, timeout=120, check=True).stdout


def measure(page: Path, width: int = 1400, height: int = 900, browser: str | None = None) -> dict:
    """Lay ``page`` out at ``width`` × ``height`` CSS pixels and return the MEASURE script's numbers."""
    browser = browser or find_browser()
    if browser is None:
        raise FileNotFoundError(f"no headless browser found (looked for {', '.join(BROWSERS)})")
    with tempfile.TemporaryDirectory() as folder:
        probe = Path(folder) / "page.html"
        probe.write_text(page.read_text().replace("</body>", MEASURE + "</body>"))
        dom = _chromium(browser, width, height, "--dump-dom", probe.as_uri())
    found = re.search(r'<pre id="fnf-measure">(.*?)</pre>', dom, re.S)
    if found is None:
        raise RuntimeError(f"{page}: the browser ran no script (no measurements in its DOM)")
    return json.loads(found.group(1))


def screenshot(page: Path, png: Path, width: int = 1400, height: int = 900, browser: str | None = None) -> Path:
    """Save what a ``width`` × ``height`` window shows of ``page`` (its top) as ``png``."""
    browser = browser or find_browser()
    png.parent.mkdir(parents=True, exist_ok=True)
    _chromium(browser, width, height, f"--screenshot={png.resolve()}", page.resolve().as_uri())
    return png


def overflows(measured: dict) -> list[str]:
    """What sticks out of the viewport, in words; empty when the page fits."""
    viewport = measured["viewport"]
    return [f"{what} ends at x = {measured[key]:.0f} > viewport {viewport}"
            for what, key in (("the page", "page_width"), ("a table", "table_right"), ("a chart", "chart_right"),
                              ("an image", "image_right")) if measured[key] > viewport] + [
        f"chart text cut off at its chart's edge: {text!r}" for text in measured["clipped_chart_texts"]]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("page", type=Path, help="index.html written by fnf report")
    parser.add_argument("--png", type=Path, default=Path("report_screenshot.png"), help="screenshot of the window")
    parser.add_argument("--full-page", type=Path, help="also a screenshot of the whole page, this tall")
    parser.add_argument("--width", type=int, default=1400)
    parser.add_argument("--height", type=int, default=900)
    args = parser.parse_args(argv)
    measured = measure(args.page, args.width, args.height)
    screenshot(args.page, args.png, args.width, args.height)
    if args.full_page:
        screenshot(args.page, args.full_page, args.width, measured["page_height"])
    print(json.dumps(measured, indent=2))
    problems = overflows(measured)
    for problem in problems:
        print(f"{args.page}: {problem}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
