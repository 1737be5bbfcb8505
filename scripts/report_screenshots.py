"""Screenshots of a built Snakemake report (home, the ablation item, the localization panels) in headless Chromium.

A developer's check of what an analyst sees, not part of the pipeline or the tests. Needs Debian's chromium and
Playwright's Python package (its own browser download is not used, so it works offline once installed):

    apt-get install -y chromium
    python3 -m venv /tmp/pw && /tmp/pw/bin/pip install playwright
    /tmp/pw/bin/python scripts/report_screenshots.py results/demo/report.html --out /tmp/shots

Writes report_home.png, report_ablation.png and report_panels.png into ``--out``.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from playwright.sync_api import sync_playwright

# Chromium flags for a machine without a network or a display (it otherwise keeps trying to reach Google's hosts).
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
        "--disable-component-update", "--disable-sync"]
ITEMS = [("1. Ablation", "ablation.html", "report_ablation"), ("3. Localization", "panels.png", "report_panels")]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("report", type=Path, help="the report.html that `snakemake --report` built")
    ap.add_argument("--out", type=Path, required=True, help="folder for the PNG files")
    ap.add_argument("--chromium", default="/usr/bin/chromium", help="the browser binary")
    a = ap.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    url = a.report.resolve().as_uri()
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=a.chromium, args=ARGS, headless=True)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.goto(url)
        page.wait_for_timeout(2000)  # the report is a React page: let it render
        page.screenshot(path=str(a.out / "report_home.png"))
        for category, item, shot in ITEMS:
            page.goto(url)
            page.wait_for_timeout(1500)
            page.get_by_text(category, exact=True).click()
            page.wait_for_timeout(800)
            page.locator("tr", has_text=item).first.locator("a[iconname=eye]").click()  # the item's "view" button
            page.wait_for_timeout(2500)
            page.screenshot(path=str(a.out / f"{shot}.png"))
        browser.close()
    print(f"screenshots in {a.out}")


if __name__ == "__main__":
    main()
