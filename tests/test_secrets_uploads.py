"""What a stranger can get from a public server that was never meant for them: the key that signs each browser's list
of runs (never sent, never served), another visitor's runs (a forged list is never trusted) and room on the disk
(uploads are refused). Served for real around a tiny real pipeline; browsers are Chromium through Playwright."""

from __future__ import annotations

import base64
import hashlib
import os
import secrets
from pathlib import Path

import httpx
import pytest

import app
from ui.uploads import UploadGate, UploadLimits
import tests.serving
from pipelines.loading import ModelLoader
from tests.tiny import tiny_pipeline
from ui.history import LEGACY_KEY_FILE, STORAGE_KEY, history_key, key_file, sign_runs, verify_runs

MODEL = "tiny-sd"
RUN_A = "20260101-120000-0123456789abcdef01234567"  # well-formed run ids (what Playground.start names a folder)
RUN_B = "20260101-120001-89abcdef0123456789abcdef"


@pytest.fixture(scope="module")
def pipe():
    return tiny_pipeline("sd")


def _serve(pipe, outputs: Path):
    loader = ModelLoader(device="cpu")
    loader.add(MODEL, pipe)
    return tests.serving.serve(loader, outputs, models=[MODEL], preview_interval=0.05)


@pytest.fixture(scope="module")
def server(tmp_path_factory, pipe):
    """The app with PLAYGROUND_SECRET set to a fresh random value and its own Gradio upload folder; yields
    (url, outputs folder, secret, upload folder)."""
    secret = secrets.token_hex(24)
    uploads = tmp_path_factory.mktemp("gradio-uploads")
    outputs = tmp_path_factory.mktemp("outputs")
    with pytest.MonkeyPatch.context() as env:
        env.setenv("PLAYGROUND_SECRET", secret)
        env.setenv("GRADIO_TEMP_DIR", str(uploads))
        with _serve(pipe, outputs) as (url, demo):
            assert Path(demo.server_app.uploaded_file_dir) == uploads
            yield url, outputs, secret, uploads


def test_the_key_is_in_no_response(server):
    url, _, secret, _ = server
    for path in ("config", "", "gradio_api/info", "gradio_api/info?all_endpoints=true"):
        response = httpx.get(f"{url}{path}")
        assert response.status_code == 200 and response.text, path
        assert secret not in response.text, f"PLAYGROUND_SECRET is in GET /{path}"


def test_a_signed_run_list_verifies_only_as_signed():
    key, other = secrets.token_bytes(32), secrets.token_bytes(32)
    token = sign_runs([RUN_A, RUN_B], key)
    assert verify_runs(token, key) == [RUN_A, RUN_B]
    version, body, tag = token.split(".")
    forged_body = base64.urlsafe_b64encode(f'["{RUN_A}","{RUN_B}","{RUN_A[:-1]}8"]'.encode()).decode()
    for forged in ([RUN_A], RUN_A, f"{version}.{forged_body}.{tag}", sign_runs([RUN_A], other), f"{token}x",
                   f"v2.{body}.{tag}", "", None, {"v1": token}, "HMIwZ/l8RvLGu7R==:U2FsdGVkX18wjLkmvdNi3w=="):
        assert verify_runs(forged, key) == [], forged
    assert verify_runs(sign_runs(["../../etc", RUN_A], key), key) == [RUN_A]  # only run folder names come back


def test_the_key_file_is_private_stable_and_never_served(tmp_path, pipe, monkeypatch):
    """Without PLAYGROUND_SECRET the key is created once outside every served folder (the same after a restart);
    the old key file in the outputs folder is removed; no route serves either, and no response carries the key."""
    monkeypatch.delenv("PLAYGROUND_SECRET", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    outputs = tmp_path / "outputs"
    outputs.mkdir()
    legacy = outputs / LEGACY_KEY_FILE
    legacy.write_text("an old key, once downloadable")
    with _serve(pipe, outputs) as (url, _):
        path = key_file()
        assert path is not None and path.is_file() and not path.is_relative_to(outputs)
        value = path.read_text().strip()
        assert len(value) >= 32 and path.stat().st_mode & 0o077 == 0, oct(path.stat().st_mode)
        assert not legacy.exists()
        assert not [f for f in outputs.rglob("*") if f.is_file() and value in f.read_text(errors="replace")]
        legacy.write_text(value)  # an old key that could not be removed (a read-only folder): still not served
        for target in (path, outputs / LEGACY_KEY_FILE, outputs / path.name):
            response = httpx.get(f"{url}gradio_api/file={target}")
            assert response.status_code != 200 and value not in response.text, (target, response.status_code)
        for route in ("config", "", "gradio_api/info"):
            assert value not in httpx.get(f"{url}{route}").text, route
    assert history_key() == history_key() and path.read_text().strip() == value  # a restart reads the same key


def test_launch_refuses_a_key_inside_a_served_folder(tmp_path, monkeypatch):
    monkeypatch.delenv("PLAYGROUND_SECRET", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "outputs" / "cache"))
    demo = app._Blocks()
    demo.outputs_dir = tmp_path / "outputs"
    with pytest.raises(ValueError, match="history key .* is inside a folder the server serves"):
        demo.launch(prevent_thread_lock=True, server_name="127.0.0.1", server_port=tests.serving.free_port())


def _browser(playwright):
    return playwright.chromium.launch(executable_path="/usr/bin/chromium",
                                      args=["--no-sandbox", "--disable-gpu", "--no-first-run"])


def _history_loaded(page) -> None:
    """Wait until the page-load event has filled the history (its label then says how many runs, or none yet)."""
    page.wait_for_function(
        "() => { const h = document.querySelector('#history'); return h && /Past runs(:| \\()/.test(h.innerText); }",
        timeout=30000)


def _run(page, prompt: str) -> None:
    """Make a 2-step run on the page and wait until it is in the history."""
    page.get_by_label("Prompt", exact=True).fill(prompt)
    steps = page.get_by_label("Steps").first
    steps.fill("2")
    steps.press("Enter")
    page.locator("#prompt-block").get_by_role("button", name="Generate").click()
    page.locator("#history button", has_text=prompt).first.wait_for(timeout=60000)


# BrowserState's own storage format (gradio's frontend, CryptoJS): base64(iv) ":" OpenSSL "Salted__" AES-256-CBC,
# the passphrase the hex SHA-256 of the component's `secret`, key and IV derived from it by MD5 EVP_BytesToKey.
WRAP = """async ([storageKey, keyHex, ivHex, saltHex, text]) => {
    const hex = h => Uint8Array.from(h.match(/../g).map(b => parseInt(b, 16)));
    const key = await crypto.subtle.importKey("raw", hex(keyHex), "AES-CBC", false, ["encrypt"]);
    const data = new TextEncoder().encode(text);
    const ct = new Uint8Array(await crypto.subtle.encrypt({name: "AES-CBC", iv: hex(ivHex)}, key, data));
    const raw = [...new TextEncoder().encode("Salted__"), ...hex(saltHex), ...ct];
    localStorage.setItem(storageKey, btoa("0123456789abcdef") + ":" + btoa(String.fromCharCode(...raw)));
}"""


def _store_wrapped(page, storage_key: str, wrap_secret: str, text: str) -> None:
    """Write `text` into the page's BrowserState entry as the page itself would, using what /config sends."""
    passphrase = hashlib.sha256(wrap_secret.encode()).hexdigest().encode()
    salt, derived, block = secrets.token_bytes(8), b"", b""
    while len(derived) < 48:
        block = hashlib.md5(block + passphrase + salt).digest()
        derived += block
    page.evaluate(WRAP, [storage_key, derived[:32].hex(), derived[32:48].hex(), salt.hex(), text])


def test_a_forged_run_list_shows_no_other_visitors_run(server):
    """Visitor A's run is in A's history and stays after a reload. Visitor B writes a list holding A's real run id
    into its BrowserState, plain and wrapped the way the page wraps it (with the wrapping secret /config sends
    everyone): after a reload B's history is empty, and B's own run then shows alone."""
    sync_api = pytest.importorskip("playwright.sync_api")
    url, outputs, _, _ = server
    config = httpx.get(f"{url}config").json()
    state = next(c["props"] for c in config["components"] if c["type"] == "browserstate")
    assert state["storage_key"] == STORAGE_KEY
    with sync_api.sync_playwright() as p:
        browser = _browser(p)
        a = browser.new_context().new_page()
        a.goto(url)
        _history_loaded(a)
        _run(a, "visitor A only")
        run_a = next(d.name for d in outputs.iterdir() if (d / "trace.json").is_file())
        a.reload()
        _history_loaded(a)
        a.locator("#history button", has_text="visitor A only").first.wait_for(timeout=30000)

        b = browser.new_context().new_page()
        b.goto(url)
        _history_loaded(b)
        forged = f'["{run_a}"]'
        for write in (lambda: b.evaluate("([k, v]) => localStorage.setItem(k, v)", [STORAGE_KEY, forged]),
                      lambda: _store_wrapped(b, STORAGE_KEY, state["secret"], forged)):
            write()
            b.reload()
            _history_loaded(b)
            assert "none yet from this browser" in b.locator("#history").inner_text(), b.locator("#history").inner_text()
            assert b.locator("#history button").count() == 0
        _run(b, "visitor B only")
        b.reload()
        _history_loaded(b)
        b.locator("#history button", has_text="visitor B only").first.wait_for(timeout=30000)
        shown = b.locator("#history").inner_text()
        assert "Past runs (1;" in shown and "visitor A only" not in shown, shown
        browser.close()


@pytest.mark.parametrize("route,status,detail", [
    ("gradio_api/upload", 415, "this server takes only PNG images (PNG info); 'x.png' is not one"),  # ui/pnginfo.py
    ("gradio_api/process_recording", 403, "this server takes uploads only at /gradio_api/upload"),
    ("gradio_api/component_server", 403, "this server takes uploads only at /gradio_api/upload")])
def test_uploads_are_refused_and_nothing_is_kept(server, route, status, detail):
    """The one upload the page takes is a PNG for PNG info (tests/test_pnginfo.py); anything else is refused."""
    url, _, _, uploads = server
    before = set(uploads.rglob("*"))
    response = httpx.post(f"{url}{route}", files={"files": ("x.png", os.urandom(4096), "image/png")})
    assert response.status_code == status and response.json() == {"detail": detail}, response.text
    assert set(uploads.rglob("*")) == before
    assert httpx.get(f"{url}config").status_code == 200  # and the server serves on


def test_an_allowed_upload_is_bounded_in_size_count_and_total():
    """The seam a file-taking feature will use: UploadLimits let uploads through to the upload route only, each at
    most request_bytes, per_client of them and bytes_per_client in all per client and window."""
    import asyncio

    from starlette.applications import Starlette
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route

    async def taken(request):
        return PlainTextResponse(str(len(await request.body())))

    inner = Starlette(routes=[Route("/gradio_api/upload", taken, methods=["POST"]),
                              Route("/gradio_api/component_server", taken, methods=["POST"])])
    gate = UploadGate(inner, UploadLimits(request_bytes=2000, per_client=3, bytes_per_client=3000))

    async def send(sizes, route="gradio_api/upload"):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=gate), base_url="http://t") as client:
            return [await client.post(f"/{route}", files={"files": ("x.png", b"x" * n)}) for n in sizes]

    first, big, second, third = asyncio.run(send([1000, 3000, 1000, 1000]))
    assert first.status_code == second.status_code == 200 and big.status_code == 413, (first.text, big.text)
    assert "at most 2000 bytes" in big.json()["detail"]
    assert third.status_code == 429 and "3000 bytes per 3600 s" in third.json()["detail"]  # 3 × ~1.2 KB > 3000
    elsewhere, = asyncio.run(send([10], "gradio_api/component_server"))
    assert elsewhere.status_code == 403 and "only at /gradio_api/upload" in elsewhere.json()["detail"]
