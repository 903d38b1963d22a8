"""Open an HTML page in a real headless browser and report what a reader would see.

Used by the report tests: every figure must have loaded (``naturalWidth > 0``), the page
must log no console error and load nothing from the network, and the expected section
headings must be there.

The browser is the system Chromium (Debian's ``/usr/bin/chromium``; ``make browser``
installs it), driven through the ``playwright`` Python package with
``executable_path=...``. Playwright's own browser download is never used: do **not** run
``playwright install``. Each call starts a fresh browser with a fresh, temporary profile.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

#: Flags for a quiet, sandbox-free, offline-friendly headless Chromium.
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--disable-default-apps",
    "--disable-extensions",
    "--mute-audio",
)
DEFAULT_CHROMIUM = "/usr/bin/chromium"

_PAGE_JS = r"""
() => {
  const clean = (t) => (t || "").replace(/¶/g, "").replace(/\s+/g, " ").trim();
  const images = Array.from(document.images).map((img) => ({
    src: (img.currentSrc || img.src || "").slice(0, 80),
    naturalWidth: img.naturalWidth,
    naturalHeight: img.naturalHeight,
    complete: img.complete,
    alt: img.alt || "",
  }));
  const headings = Array.from(document.querySelectorAll("h1, h2, h3")).map((h) => ({
    level: Number(h.tagName.slice(1)), text: clean(h.innerText), id: h.id || "",
  }));
  // Text per h1/h2 section: notebook cells (nbconvert) in document order, else body text.
  const sections = [];
  let current = {heading: "", text: ""};
  const cells = document.querySelectorAll(".jp-Cell");
  const blocks = cells.length ? Array.from(cells) : [document.body];
  for (const cell of blocks) {
    const hs = cell.querySelectorAll("h1, h2");
    if (hs.length) {
      sections.push(current);
      current = {heading: clean(hs[hs.length - 1].innerText), text: ""};
    }
    current.text += " " + clean(cell.innerText);
  }
  sections.push(current);
  return {
    title: document.title,
    images,
    headings,
    sections: sections.filter((s) => s.heading || s.text.trim()),
    scripts: Array.from(document.scripts).map((s) => s.src).filter((s) => s),
    stylesheets: Array.from(document.querySelectorAll('link[rel="stylesheet"]')).map((l) => l.href),
    width: document.documentElement.scrollWidth,
    height: document.documentElement.scrollHeight,
  };
}
"""


class BrowserNotFoundError(FileNotFoundError):
    """No Chromium to run the browser checks with."""


def find_chromium(path: str | os.PathLike | None = None) -> str:
    """The Chromium executable: ``path``, else ``$EMBEDLENS_CHROMIUM``, else
    ``/usr/bin/chromium``, else ``chromium`` / ``chromium-browser`` on PATH."""
    candidates = [path, os.environ.get("EMBEDLENS_CHROMIUM"), DEFAULT_CHROMIUM,
                  shutil.which("chromium"), shutil.which("chromium-browser")]
    for c in candidates:
        if c and Path(c).is_file() and os.access(c, os.X_OK):
            return str(c)
    raise BrowserNotFoundError(
        f"Chromium not found (looked for {path or '$EMBEDLENS_CHROMIUM'}, {DEFAULT_CHROMIUM}, chromium on PATH). "
        "Install Debian's chromium (`make browser`, or `apt-get install chromium`) or set EMBEDLENS_CHROMIUM "
        "to a Chromium/Chrome executable.")


def _playwright():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            "the browser checks need the `playwright` Python package (pip install playwright; it is in "
            "the project's test extra). Do not run `playwright install`: the system Chromium is used."
        ) from exc
    return sync_playwright


def check_page(
    html_path: str | os.PathLike,
    screenshot_path: str | os.PathLike | None,
    *,
    chromium: str | os.PathLike | None = None,
    width: int = 1280,
    height: int = 900,
    timeout_s: float = 60.0,
) -> dict[str, Any]:
    """Open ``html_path`` (a local file) in headless Chromium, take a full-page screenshot
    and report what loaded.

    Returns a dict:
    ``images`` (``src`` prefix, ``naturalWidth``, ``naturalHeight``, ``complete``, ``alt``),
    ``console_errors`` (console messages of type error plus uncaught page exceptions),
    ``console`` (every console message as ``type: text``), ``failed_requests``,
    ``external_requests`` (any URL that is not ``file:``/``data:``/``blob:``/``about:``),
    ``headings`` (``level``, ``text``, ``id`` of h1–h3), ``sections`` (``heading`` and the
    visible ``text`` under each h1/h2), ``scripts``/``stylesheets`` (external ones),
    ``title``, page ``width``/``height`` and ``screenshot`` (the path, or None).
    """
    html = Path(html_path).resolve()
    if not html.is_file():
        raise FileNotFoundError(f"{html}: no such HTML file")
    exe = find_chromium(chromium)
    sync_playwright = _playwright()
    console: list[str] = []
    errors: list[str] = []
    failed: list[str] = []
    external: list[str] = []
    local = ("file:", "data:", "blob:", "about:", "chrome:", "devtools:")
    with tempfile.TemporaryDirectory(prefix="embedlens-chromium-") as profile, sync_playwright() as pw:
        ctx = pw.chromium.launch_persistent_context(
            profile,
            executable_path=exe,
            headless=True,
            args=list(CHROMIUM_FLAGS),
            viewport={"width": width, "height": height},
            device_scale_factor=1,
            timeout=timeout_s * 1000,
            env={**os.environ, "HOME": profile},
        )
        try:
            page = ctx.new_page()
            page.set_default_timeout(timeout_s * 1000)

            def on_console(msg):
                console.append(f"{msg.type}: {msg.text}")
                if msg.type == "error":
                    loc = msg.location or {}
                    where = f" ({loc.get('url', '')}:{loc.get('lineNumber', '')})" if loc.get("url") else ""
                    errors.append(msg.text + where)

            page.on("console", on_console)
            page.on("pageerror", lambda exc: errors.append(f"uncaught exception: {exc}"))
            page.on("requestfailed", lambda req: failed.append(f"{req.url[:120]} ({req.failure})"))
            page.on("request", lambda req: external.append(req.url[:200])
                    if not req.url.startswith(local) else None)
            page.goto(html.as_uri(), wait_until="load")
            page.wait_for_function("Array.from(document.images).every((i) => i.complete)")
            info = page.evaluate(_PAGE_JS)
            shot = None
            if screenshot_path is not None:
                shot = Path(screenshot_path)
                shot.parent.mkdir(parents=True, exist_ok=True)
                page.screenshot(path=str(shot), full_page=True)
        finally:
            ctx.close()
    info.update({
        "console_errors": errors,
        "console": console,
        "failed_requests": failed,
        "external_requests": external,
        "screenshot": str(shot) if shot is not None else None,
        "chromium": exe,
    })
    return info
