"""Headless Chromium for the explorer: its tests and the README's screenshot.

The browser is the system's Chromium (Debian's ``chromium`` package, ``/usr/bin/chromium``;
another path with the environment variable ``NLREF_CHROMIUM``), driven by Playwright
(``pip install playwright``; no browser download: ``playwright install`` is not needed).
It starts with a fresh profile, and with every background service that could reach the
network turned off.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

__all__ = ["CHROMIUM_ARGS", "chromium_path", "headless_chromium", "screenshot"]

#: Flags for a quiet, offline, headless Chromium.
CHROMIUM_ARGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
)


def chromium_path() -> str | None:
    """The Chromium executable: ``$NLREF_CHROMIUM``, else ``/usr/bin/chromium``, else
    ``chromium`` on the PATH; None when there is none."""
    for candidate in (os.environ.get("NLREF_CHROMIUM"), "/usr/bin/chromium"):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return shutil.which("chromium")


@contextmanager
def headless_chromium(*, width: int = 1200, height: int = 820) -> Iterator[Any]:
    """A Playwright browser context of headless Chromium with a fresh profile.

    Raises
    ------
    FileNotFoundError
        If no Chromium executable is found (install Debian's ``chromium``).
    ImportError
        If Playwright is not installed.
    """
    from playwright.sync_api import sync_playwright

    executable = chromium_path()
    if executable is None:
        raise FileNotFoundError(
            "no Chromium found: install it (Debian: apt-get install chromium) or set "
            "NLREF_CHROMIUM to its path"
        )
    with tempfile.TemporaryDirectory(prefix="nlref-chromium-") as profile:
        with sync_playwright() as playwright:
            context = playwright.chromium.launch_persistent_context(
                profile,
                executable_path=executable,
                headless=True,
                args=list(CHROMIUM_ARGS),
                viewport={"width": width, "height": height},
            )
            try:
                yield context
            finally:
                context.close()


def screenshot(
    page_path: str | Path,
    png_path: str | Path,
    *,
    script: str | None = None,
    width: int = 1200,
    height: int = 820,
) -> Path:
    """Open an explorer page from disk, run ``script`` (JavaScript, e.g. a selection) once it
    is ready, and save a PNG screenshot of the viewport."""
    png_path = Path(png_path)
    with headless_chromium(width=width, height=height) as context:
        page = context.new_page()
        page.goto(Path(page_path).resolve().as_uri())
        page.evaluate("window.nlref.ready")
        if script:
            page.evaluate(script)
        png_path.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(png_path))
    return png_path
