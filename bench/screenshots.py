"""The README's screenshots: serve the studio, walk it in chromium, write ``docs/screenshots/<page>.png``.

The walk is the browser test's (:mod:`bench.studio_walk`: Data, Refine, Embeddings, Inspect,
Results, each checked for errors before its shot); the server runs on the bundled demo with its own
``REFINERY_HOME`` in a temporary folder, so nothing touches ``~/.refinery``. Tests never write
these files; run this script when the pages change and commit the pictures it leaves.

Run from the repository root: ``python bench/screenshots.py`` (about 1-2 minutes on 2 cores), or
``--out FOLDER`` to write the pictures elsewhere. Needs Debian's chromium (``/usr/bin/chromium``)
and the ``playwright`` Python package.
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.studio import CHROMIUM, REPO, browser_page, launch_chromium, served

SCREENSHOTS = REPO / "docs" / "screenshots"
SERVER_START_S = 60


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=SCREENSHOTS, help=f"folder for the PNG files (default {SCREENSHOTS})")
    args = parser.parse_args(argv)
    if not CHROMIUM.is_file():
        parser.error(f"{CHROMIUM} is missing (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    from bench import studio_walk

    with tempfile.TemporaryDirectory(prefix="refinery-screenshots-") as scratch:
        home, shots = Path(scratch) / "home", Path(scratch) / "shots"
        with served(home, SERVER_START_S) as server, sync_playwright() as playwright:
            browser = launch_chromium(playwright)
            try:
                with browser_page(browser, studio_walk.PAGE_MS) as page:
                    studio_walk.walk(page, server.url, studio_walk.Budget(studio_walk.WALK_S), shots)
            finally:
                browser.close()
        # Only a walk that passed every check replaces the pictures, all of them together.
        args.out.mkdir(parents=True, exist_ok=True)
        for shot in sorted(shots.glob("*.png")):
            shutil.copyfile(shot, args.out / shot.name)
            print(args.out / shot.name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
