"""The playground as an MCP tool server (Gradio's MCP support, `launch(mcp_server=True)`): which endpoints become
tools, under which names, and who is asking when a tool is called.

Gradio derives one tool per public named endpoint and describes it from the handler's docstring (`Args:` lines
describe the parameters). It calls a queued endpoint through an HTTP loopback: a gradio_client in the server
process joins the queue from 127.0.0.1, sending on the MCP request's headers. Every MCP client would then be the
one client 127.0.0.1 to the per-client admission (ui/clients.py). So `McpClientTag` writes the MCP caller's own
address (as ui/clients.py reads it: the TCP peer, or X-Forwarded-For behind trusted proxies) into a header signed
with a key only this process holds, and `tagged_client` reads it back from the loopback call: the admission and
the work budget then apply to each MCP client as to a browser at that address. A header without a valid
signature (sent by anyone else) is ignored.

No Gradio here: starlette's ASGI shapes only; `http` is anything with gr.Request's `.headers`.
"""

from __future__ import annotations

import hashlib
import hmac
from typing import Any

from ui.clients import client_address

# Tool name -> endpoint. Only these become tools; every other endpoint stays off the MCP server:
# /generate_stream gives an MCP client nothing /generate does not (a tool call returns the last output only),
# and the Explain lab's outputs are page widgets (galleries of captioned tiles, plots, progress bars, slider
# updates) that would reach an agent as Python reprs of dicts, not images.
TOOLS = {"generate": "/generate", "png_info": "/png_info"}
MCP_PATH = "/gradio_api/mcp"  # Gradio mounts its MCP routes (streamable HTTP, /sse, /messages/, /schema) here
CLIENT_HEADER = "x-playground-mcp-client"  # "<address> <signature>", written by McpClientTag


def sign(key: bytes, address: str) -> str:
    """The header value that vouches for `address`: the address and its HMAC-SHA256 under `key`."""
    return f"{address} {hmac.new(key, address.encode(), hashlib.sha256).hexdigest()}"


def tagged_client(http: Any, key: bytes) -> str | None:
    """The MCP caller's address behind a tool call (a gr.Request of Gradio's loopback call), or None where the
    request carries no header signed with `key`."""
    headers = getattr(http, "headers", None)
    value = headers.get(CLIENT_HEADER) if headers is not None else None
    if not value or " " not in value:
        return None
    address = value.rsplit(" ", 1)[0]
    return address if hmac.compare_digest(sign(key, address), value) else None


class McpClientTag:
    """ASGI middleware: on the MCP routes, replaces any CLIENT_HEADER the caller sent with the caller's address
    signed with `key` (Gradio sends the MCP request's headers on with the endpoint call it makes). Elsewhere the
    header is left as it came: only a valid signature counts (`tagged_client`)."""

    def __init__(self, app: Any, key: bytes, trusted_proxy_hops: int = 0) -> None:
        self.app = app
        self.key = key
        self.hops = trusted_proxy_hops

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["path"].startswith(MCP_PATH):
            name = CLIENT_HEADER.encode()
            headers = [(k, v) for k, v in scope["headers"] if k.lower() != name]
            peer = scope["client"][0] if scope.get("client") else None
            forwarded = ", ".join(v.decode("latin-1") for k, v in headers if k.lower() == b"x-forwarded-for")
            address = client_address(peer, forwarded or None, self.hops)
            if address is not None:
                headers.append((name, sign(self.key, address).encode("latin-1")))
            scope = dict(scope, headers=headers)
        await self.app(scope, receive, send)
