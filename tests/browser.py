"""Render a self-contained HTML page in headless Chromium: its screenshot and its DOM.

CI sets FEDMED_REQUIRE_BROWSER=1 (``make test`` installs Debian's chromium): there a missing
browser fails the test instead of skipping it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

# matplotlib's first colours: the pages themselves use only greys
C0_BLUE = (31, 119, 180)
C3_RED = (214, 39, 40)


def chromium() -> str:
    """The browser's path; skips the test (fails it under CI) when there is none."""
    found = shutil.which("chromium")
    if found is None:
        if os.environ.get("FEDMED_REQUIRE_BROWSER") == "1":
            pytest.fail("chromium is not installed (make test installs Debian's chromium)")
        pytest.skip("chromium not installed")
    return found


def render(page: Path, scratch: Path, height: int = 2400) -> tuple[np.ndarray, str]:
    """(screenshot pixels (H, W, 3) as ints, the DOM after rendering) of ``page``."""
    browser = chromium()
    flags = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={scratch / 'profile'}",
    ]
    shot = scratch / f"{page.stem}.screenshot.png"
    subprocess.run(
        [browser, *flags, f"--screenshot={shot}", f"--window-size=1200,{height}", page.as_uri()],
        check=True,
        capture_output=True,
        timeout=120,
    )
    dom = subprocess.run(
        [browser, *flags, "--dump-dom", page.as_uri()],
        check=True,
        capture_output=True,
        text=True,
        timeout=120,
    ).stdout
    from PIL import Image

    return np.asarray(Image.open(shot).convert("RGB")).astype(int), dom


def pixels_of(pixels: np.ndarray, colour: tuple[int, int, int]) -> int:
    """How many pixels are (close to) ``colour``."""
    return int((np.abs(pixels - np.array(colour)).sum(axis=2) < 40).sum())
