"""The playground as an MCP tool server (ui/mcp.py), served for real around the tiny SD pipeline and called through
the `mcp` package's own client (streamable HTTP and SSE, loopback only): which tools it offers and how they are
described, the image `generate` returns against /generate's pixels for the same seed, and the per-client admission
and work budget applied to each MCP client under its own address; `python app.py` serves it by default and
PLAYGROUND_MCP=0 turns it off."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import os
import re
import subprocess
import sys
import time

import httpx
import numpy as np
import pytest
from PIL import Image

from pipelines.loading import ModelLoader
from tests.serving import ROOT, app_processes, serve
from tests.tiny import tiny_pipeline
from ui.mcp import sign, tagged_client

pytest.importorskip("mcp")
gradio_client = pytest.importorskip("gradio_client")

from mcp import ClientSession  # noqa: E402
from mcp.client.sse import sse_client  # noqa: E402
from mcp.client.streamable_http import streamable_http_client  # noqa: E402

MODEL = "tiny-sd"
QUICK = dict(prompt="a red circle", num_inference_steps=3, seed=7)
TOOLS = {"generate", "png_info"}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The real app (MCP on: build_demo's default) on a free port, one run per client at a time: (url, playground)."""
    loader = ModelLoader(device="cpu")
    loader.add(MODEL, tiny_pipeline("sd"))
    with serve(loader, tmp_path_factory.mktemp("outputs"), models=[MODEL], preview_interval=0.05,
               max_runs_per_client=1) as (url, demo):
        yield url, demo.playground


@contextlib.asynccontextmanager
async def mcp_session(url: str, address: str = "127.0.0.1", transport: str = "http"):
    """An initialized MCP client session to the app at `url`, its socket bound to `address` (so the server sees a
    distinct client), over streamable HTTP (/gradio_api/mcp/) or SSE (/gradio_api/mcp/sse)."""
    def http_client(headers=None, timeout=None, auth=None) -> httpx.AsyncClient:
        return httpx.AsyncClient(transport=httpx.AsyncHTTPTransport(local_address=address), headers=headers,
                                 timeout=timeout or httpx.Timeout(30, read=300), auth=auth)

    async with contextlib.AsyncExitStack() as stack:
        if transport == "http":
            http = await stack.enter_async_context(http_client())
            read, write, _ = await stack.enter_async_context(
                streamable_http_client(url + "gradio_api/mcp/", http_client=http))
        else:
            read, write = await stack.enter_async_context(
                sse_client(url + "gradio_api/mcp/sse", httpx_client_factory=http_client))
        session = await stack.enter_async_context(ClientSession(read, write))
        await session.initialize()
        yield session


async def until(condition, timeout: float, what: str) -> None:
    """tests.serving.wait_until for a test that runs MCP calls on this event loop: awaits between checks."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} (waited {timeout:g} s)")
        await asyncio.sleep(0.02)


def texts(result) -> str:
    return "\n".join(c.text for c in result.content if c.type == "text")


def mcp_image(result) -> np.ndarray:
    """The image of a `generate` tool result as RGB pixels: its MCP image content, where Gradio sends one, else
    the PNG its URL names (Gradio's MCP server, without a progress token, sends the outputs as one text)."""
    images = [c for c in result.content if c.type == "image"]
    if images:
        assert images[0].mimeType == "image/png"
        data = base64.b64decode(images[0].data)
    else:
        urls = re.findall(r"https?://[^'\"\s]+/gradio_api/file=[^'\"\s]+\.png", texts(result))
        assert urls, texts(result)
        data = httpx.get(urls[0], timeout=30).raise_for_status().content
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def test_schema_offers_generate_and_png_info_only_each_parameter_described(server):
    url, _ = server
    schema = {t["name"]: t for t in httpx.get(url + "gradio_api/mcp/schema", timeout=30).json()}
    assert set(schema) == TOOLS
    for name, tool in schema.items():
        undescribed = [p for p, spec in tool["inputSchema"]["properties"].items() if not spec.get("description")]
        assert not undescribed, f"parameters of {name} without a description: {undescribed}"
    # The other public endpoints stay HTTP endpoints, not tools; private events are neither.
    endpoints = set(httpx.get(url + "gradio_api/info", timeout=30).json()["named_endpoints"])
    assert {"/generate", "/generate_stream", "/png_info", "/explain_jump", "/explain_sweep"} <= endpoints
    generate = schema["generate"]
    assert generate["meta"]["endpoint_name"] == "generate"
    assert generate["description"].startswith("Make an image") and "Returns:" in generate["description"]
    properties = generate["inputSchema"]["properties"]
    assert generate["inputSchema"]["required"] == ["prompt"]
    assert MODEL in properties["model"]["description"] and properties["model"]["default"] == MODEL
    assert "dpmpp_2m_karras" in properties["scheduler"]["description"]
    assert "rescale" in properties["guidance"]["description"]
    assert "-1 (default)" in properties["seed"]["description"] and properties["seed"]["default"] == -1
    assert "0 (default)" in properties["width"]["description"]


def test_generate_through_an_mcp_client_makes_the_pixels_generate_makes(server):
    """The `mcp` client lists the tools and calls generate; the image it gets (as MCP image content when it asks
    for progress, as the image's URL when it does not) has the pixels /generate makes for the same seed."""
    url, _ = server
    path, seed, _, _ = gradio_client.Client(url, verbose=False).predict(**QUICK, api_name="/generate")
    expected = np.asarray(Image.open(path).convert("RGB"))
    assert seed == QUICK["seed"]

    async def calls():
        async with mcp_session(url) as session:
            tools = {t.name: t for t in (await session.list_tools()).tools}
            assert set(tools) == TOOLS
            assert "seed" in tools["generate"].inputSchema["properties"]
            progress = []

            async def on_progress(done, total, message):
                progress.append(message)

            with_progress = await session.call_tool("generate", QUICK, progress_callback=on_progress)
            plain = await session.call_tool("generate", QUICK)
            return with_progress, plain, progress

    with_progress, plain, progress = asyncio.run(calls())
    assert not with_progress.isError and not plain.isError, (texts(with_progress), texts(plain))
    assert [c.type for c in with_progress.content].count("image") == 1  # the image; the batch comes as text
    assert str(QUICK["seed"]) in [c.text for c in with_progress.content if c.type == "text"]  # the seed used
    assert progress, "no progress notification reached the client"
    for result in (with_progress, plain):
        pixels = mcp_image(result)
        assert pixels.shape == expected.shape
        assert np.array_equal(pixels, expected)


def test_png_info_reads_a1111_text_through_mcp(server):
    url, _ = server
    text = "a red circle\nNegative prompt: blue\nSteps: 3, Sampler: Euler a, CFG scale: 5, Seed: 9, Size: 32x32"

    async def call():
        async with mcp_session(url) as session:
            return await session.call_tool("png_info", {"text": text})

    result = asyncio.run(call())
    assert not result.isError, texts(result)
    assert "'seed': 9" in texts(result) and "euler_a" in texts(result)


def test_each_mcp_client_is_held_to_its_own_limit_and_the_work_budget(server):
    """max_runs_per_client=1. An MCP client whose 999-step run is going is refused a second call with the limit's
    variable, while another MCP client at another address is admitted; neither is counted as the loopback address
    Gradio's MCP server calls the endpoint from. A request over the work budget is refused with its variable."""
    url, playground = server

    async def scenario():
        async with mcp_session(url, "127.0.0.2") as first, mcp_session(url, "127.0.0.3") as second:
            long = asyncio.create_task(first.call_tool("generate", dict(QUICK, num_inference_steps=999, seed=1)))
            await until(lambda: playground.admission.count("127.0.0.2") == 1, 60, "the long run was not admitted")
            refused = await first.call_tool("generate", QUICK)
            other = asyncio.create_task(second.call_tool("generate", QUICK))
            await until(lambda: playground.admission.count("127.0.0.3") == 1, 60,
                        "the other MCP client was not admitted under its own address")
            loopback = playground.admission.count("127.0.0.1")
            for run in list(playground.pending):  # as Stop does: the long run ends at its next step
                if run.request.num_inference_steps == 999:
                    run.latest.cancel()
            other, long = await other, await long
            over_budget = await second.call_tool("generate", dict(QUICK, width=4096, height=4096))
            return refused, other, long, loopback, over_budget

    refused, other, long, loopback, over_budget = asyncio.run(scenario())
    assert refused.isError and "PLAYGROUND_MAX_RUNS_PER_CLIENT=1" in texts(refused), texts(refused)
    assert not other.isError, texts(other)
    assert mcp_image(other).shape == (32, 32, 3)
    assert loopback == 0
    steps = re.search(r"'steps_completed': (\d+)", texts(long))
    assert long.isError or (steps and int(steps[1]) < 999), texts(long)  # stopped, or its image where it stopped
    assert over_budget.isError and "PLAYGROUND_MAX_PIXELS" in texts(over_budget), texts(over_budget)


def test_only_a_signature_of_the_process_key_names_an_mcp_client():
    key, other_key = b"k" * 32, b"o" * 32

    class Http:
        def __init__(self, value: str | None) -> None:
            self.headers = {} if value is None else {"x-playground-mcp-client": value}

    assert tagged_client(Http(sign(key, "203.0.113.5")), key) == "203.0.113.5"
    assert tagged_client(Http(sign(other_key, "203.0.113.5")), key) is None  # forged by a caller
    assert tagged_client(Http("203.0.113.5"), key) is None
    assert tagged_client(Http(None), key) is None
    assert tagged_client(None, key) is None


def test_python_app_py_serves_mcp_by_default_and_playground_mcp_0_turns_it_off(tmp_path_factory):
    """`python app.py` itself: its tools over SSE (the transport `npx mcp-remote .../gradio_api/mcp/sse` speaks) and
    the schema; with PLAYGROUND_MCP=0 no MCP route at all; another value is refused at start with the allowed ones."""
    with app_processes([(tmp_path_factory.mktemp("outputs"), None),
                        (tmp_path_factory.mktemp("outputs"), {"PLAYGROUND_MCP": "0"})]) as (on, off):
        async def tools():
            async with mcp_session(on, transport="sse") as session:
                return {t.name for t in (await session.list_tools()).tools}

        assert asyncio.run(tools()) == TOOLS
        assert {t["name"] for t in httpx.get(on + "gradio_api/mcp/schema", timeout=30).json()} == TOOLS
        assert httpx.get(off + "gradio_api/mcp/schema", timeout=30).status_code == 404
        assert httpx.get(off + "gradio_api/info", timeout=30).status_code == 200  # the HTTP API is still there
    bad = subprocess.run([sys.executable, str(ROOT / "app.py")], cwd=ROOT, capture_output=True, text=True,
                         env={**os.environ, "PLAYGROUND_MCP": "yes"}, timeout=300)
    assert bad.returncode != 0 and "PLAYGROUND_MCP must be 1" in bad.stderr and "Traceback" not in bad.stderr
