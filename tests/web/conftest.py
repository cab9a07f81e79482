"""The web page in a real browser: Debian's chromium, headless, driven by Playwright for Python
(pointed at the system browser: Playwright's own browser builds are not used), against the same
local stack the other tests use (uvicorn serving the API and /app/, the OIDC stand-in, Azurite,
SoftHSM). Each signed-in user gets a browser context of their own (its own sessionStorage).

Chromium trusts the OIDC stand-in's TLS certificate by its public key
(--ignore-certificate-errors-spki-list), nothing wider. Under CI=true a browser that can't start
fails the tests (tests/realparts.py)."""

from __future__ import annotations

import base64
import hashlib
import os
import shutil
from pathlib import Path
from typing import Callable, Iterator

import pytest

from tests.realparts import unavailable

PHONE = {"width": 390, "height": 844}
DESKTOP = {"width": 1200, "height": 900}


def chromium_path() -> str | None:
    for name in (os.environ.get("EZSSH_CHROMIUM"), "chromium", "chromium-browser"):
        if name and (path := shutil.which(name)):
            return path
    return None


def spki_pin(cert_pem: Path) -> str:
    """base64(sha256(SubjectPublicKeyInfo)) of a certificate: what chromium's SPKI list takes."""
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    cert = x509.load_pem_x509_certificate(cert_pem.read_bytes())
    der = cert.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    return base64.b64encode(hashlib.sha256(der).digest()).decode()


@pytest.fixture(scope="module")
def browser(oidc) -> Iterator:
    """Chromium for one test module. Playwright's sync API keeps an event loop running in this
    thread while it is started, so it is stopped after each module: tests that call asyncio.run()
    (tests/api/test_functions_wrapper.py) work in any order."""
    try:
        from playwright.sync_api import Error, sync_playwright
    except ImportError as exc:
        unavailable(f"playwright is not installed: {exc}")
    exe = chromium_path()
    if exe is None:
        unavailable("chromium is not installed (apt-get install chromium)")
    pw = sync_playwright().start()
    try:
        b = pw.chromium.launch(executable_path=exe, headless=True, args=[
            "--no-sandbox",  # as root the sandbox can't start
            "--disable-dev-shm-usage",  # containers often have a tiny /dev/shm
            f"--ignore-certificate-errors-spki-list={spki_pin(oidc.ca.server_cert)}",
        ])
    except Error as exc:
        pw.stop()
        unavailable(f"chromium did not start: {exc}")
    yield b
    b.close()
    pw.stop()


class Tab:
    """One page in a browser context, with the console errors (CSP violations among them), page
    errors and failed requests of the app's origin (the OIDC stand-in's own pages are not ours)."""

    def __init__(self, page, origin: str) -> None:  # type: ignore[no-untyped-def]
        self.page = page
        self.errors: list[str] = []
        self.dialogs: list[str] = []

        def console(m) -> None:  # type: ignore[no-untyped-def]
            where = m.location.get("url") or page.url
            if m.type == "error" and where.startswith(origin):
                self.errors.append(f"{m.text} at {where}")

        page.on("console", console)
        page.on("pageerror", lambda e: self.errors.append(str(e)))
        page.on("response", lambda r: self.errors.append(f"HTTP {r.status} {r.url}")
                if r.status >= 400 and r.url.startswith(origin) else None)

        def dialog(d) -> None:  # type: ignore[no-untyped-def]
            self.dialogs.append(d.message)
            d.dismiss()

        page.on("dialog", dialog)


@pytest.fixture
def signed_in(browser, api_server, oidc) -> Iterator[Callable[..., Tab]]:
    """signed_in("bob") -> a Tab on /app/ signed in as bob through the OIDC stand-in's own pages.
    signed_in("carol", tab_of=first) opens a second tab in the same browser context: tokens are kept
    per tab (sessionStorage), so it signs in again, through the stand-in's session (no password)."""
    contexts = []

    def open_as(user: str, *, path: str = "/app/", viewport: dict | None = None, tab_of: Tab | None = None) -> Tab:
        if tab_of is not None:
            tab = Tab(tab_of.page.context.new_page(), api_server)
            tab.page.goto(api_server + path)
            tab.page.locator(f'button.tenant[data-tenant="{oidc.user(user)["tid"]}"]').click()
            tab.page.wait_for_selector("#me-name", timeout=20_000)
            return tab
        ctx = browser.new_context(viewport=viewport or DESKTOP)
        contexts.append(ctx)
        tab = Tab(ctx.new_page(), api_server)
        page = tab.page
        page.goto(api_server + path)
        tid = oidc.user(user)["tid"]
        page.locator(f'button.tenant[data-tenant="{tid}"]').click()
        page.wait_for_url(f"{oidc.base_url}/**")
        page.fill('#login input[name="username"]', user)
        page.fill('#login input[name="password"]', oidc.user(user)["password"])
        page.click('#login button[type="submit"]')
        page.wait_for_selector("#me-name", timeout=20_000)
        return tab

    yield open_as
    for ctx in contexts:
        ctx.close()
