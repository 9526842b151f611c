"""Uploads: Gradio's upload routes take files from anyone, and this page takes none (yet). UploadGate, an ASGI
middleware, refuses every upload beyond UploadLimits before Gradio reads a byte of it, so nothing reaches Gradio's
upload folder. A feature that must take a file (the PNG-info drop, ui/pnginfo.py: one PNG of at most 1 MB, read in
memory and never kept) sets `_Blocks.uploads` in app.py; with `file_signature` set, the gate reads the (bounded) body
itself and refuses any file that does not start with it, so a file of another kind is never written either. Clients
are told apart as everywhere else (ui/clients.py)."""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable

from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.responses import JSONResponse

from ui.clients import client_address


@dataclass(frozen=True)
class UploadLimits:
    """What Gradio's upload route may take. The default, NO_UPLOADS, takes nothing: the page has no upload widget. A
    feature that must take a file (a PNG-info drop: one PNG of at most 1 MB, read in memory and never kept) sets
    `_Blocks.uploads`, e.g. UploadLimits(request_bytes=1_050_000, per_client=20, bytes_per_client=10_000_000)."""

    request_bytes: int = 0  # the largest upload request (its whole multipart body); 0: no uploads at all
    per_client: int = 0  # uploads one client address may make per window
    bytes_per_client: int = 0  # their total size, in bytes
    window_seconds: float = 3600.0  # the window the two above are counted over
    file_signature: bytes = b""  # every uploaded file must start with these bytes (b"": any file)
    file_bytes: int = 0  # and be at most this many bytes (0: only request_bytes bounds it); checked with the signature
    file_kind: str = "files"  # what those files are, for the refusal (e.g. "PNG images")

    def __post_init__(self) -> None:
        if min(self.request_bytes, self.per_client, self.bytes_per_client) < 0 or not self.window_seconds > 0:
            raise ValueError(f"UploadLimits: sizes and counts must be >= 0 and window_seconds > 0; got {self}")


NO_UPLOADS = UploadLimits()
# Gradio's routes that take files (gradio/routes.py); /gradio_api/component_server parses any multipart body too,
# so every multipart body is an upload wherever it is sent.
UPLOAD_ROUTES = ("/gradio_api/upload", "/gradio_api/process_recording")


class UploadGate:
    """ASGI middleware that refuses an upload beyond UploadLimits before Gradio reads a byte of it, so nothing
    reaches Gradio's upload folder. Clients are counted by address behind `trusted_proxy_hops` proxies."""

    def __init__(self, app: Any, limits: UploadLimits = NO_UPLOADS, trusted_proxy_hops: int = 0) -> None:
        self.app = app
        self.limits = limits
        self.hops = trusted_proxy_hops
        self.taken: dict[str, deque[tuple[float, int]]] = {}  # client -> (time, bytes) of its admitted uploads

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] == "http" and _is_upload(scope):
            refusal = self.admit(scope)
            if refusal is None and (self.limits.file_signature or self.limits.file_bytes):
                body, refusal = await self.sniff(scope, receive)
                if refusal is None:  # the app reads the body the gate has already read
                    receive = _replay(body, receive)
            if refusal is not None:
                status, detail = refusal
                await JSONResponse({"detail": detail}, status_code=status)(scope, receive, send)
                return
        await self.app(scope, receive, send)

    async def sniff(self, scope: dict, receive: Callable) -> tuple[bytes, tuple[int, str] | None]:
        """Read an admitted upload's body (at most request_bytes: admit checked its Content-Length) and check that
        every file in it starts with `file_signature` and holds at most `file_bytes`; (body, None) when they do, else
        (b"", (HTTP status, reason))."""
        limits = self.limits
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return b"", (400, "the upload ended before its body")
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > limits.request_bytes:
                return b"", (413, f"an upload here is at most {limits.request_bytes} bytes")
            more = message.get("more_body", False)
        body = b"".join(chunks)
        _, options = parse_options_header(dict(scope["headers"]).get(b"content-type", b""))
        try:
            files = _file_starts(body, options[b"boundary"], len(limits.file_signature))
        except (KeyError, ValueError):  # no boundary; python-multipart's parse errors are ValueErrors
            return b"", (400, "the upload is not a readable multipart/form-data body")
        if not files:
            return b"", (400, "the upload holds no file")
        for name, start, size in files:
            if start != limits.file_signature:
                return b"", (415, f"this server takes only {limits.file_kind}; {name[:60]!r} is not one")
            if limits.file_bytes and size > limits.file_bytes:
                return b"", (413, f"a file here is at most {limits.file_bytes} bytes; {name[:60]!r} is {size}")
        return body, None

    def admit(self, scope: dict) -> tuple[int, str] | None:
        """None, and the upload counted, when the limits allow it; else (HTTP status, one-line reason)."""
        limits = self.limits
        if limits.request_bytes <= 0 or limits.per_client <= 0:
            return 403, "this server takes no uploads"
        if scope["path"].rstrip("/").rsplit("/", 1)[-1] != "upload":
            return 403, "this server takes uploads only at /gradio_api/upload"
        length = dict(scope["headers"]).get(b"content-length", b"")
        if not length.isdigit():  # h11 holds the body to a declared length; a chunked one has none to check
            return 411, "an upload must declare its Content-Length"
        size = int(length)
        if size > limits.request_bytes:
            return 413, f"an upload here is at most {limits.request_bytes} bytes; this one is {size}"
        headers = scope["headers"]
        forwarded = ", ".join(v.decode("latin-1") for k, v in headers if k == b"x-forwarded-for") or None
        client = client_address((scope.get("client") or ("?",))[0], forwarded, self.hops) or "?"
        now = time.monotonic()
        if len(self.taken) > 4096:  # forget the addresses whose window has passed
            self.taken = {c: t for c, t in self.taken.items() if t and t[-1][0] > now - limits.window_seconds}
        taken = self.taken.setdefault(client, deque())
        while taken and taken[0][0] <= now - limits.window_seconds:
            taken.popleft()
        if len(taken) >= limits.per_client or sum(b for _, b in taken) + size > limits.bytes_per_client:
            return 429, (f"one address may upload at most {limits.per_client} files and {limits.bytes_per_client} "
                         f"bytes per {limits.window_seconds:g} s here; try again later")
        taken.append((now, size))
        return None


def _is_upload(scope: dict) -> bool:
    path = scope["path"].rstrip("/")
    content_type = dict(scope["headers"]).get(b"content-type", b"").lower()
    return path.endswith(UPLOAD_ROUTES) or content_type.startswith(b"multipart/")


def _file_starts(body: bytes, boundary: bytes, n: int) -> list[tuple[str, bytes, int]]:
    """(file name, first n bytes, size) of each file part of a multipart body, parsed in memory."""
    files: list[tuple[str, bytes, int]] = []
    part: dict = {}

    def on_part_begin() -> None:
        part.clear()
        part.update(headers={}, field=b"", value=b"", start=b"", size=0)

    def on_header_field(data: bytes, start: int, end: int) -> None:
        part["field"] += data[start:end]

    def on_header_value(data: bytes, start: int, end: int) -> None:
        part["value"] += data[start:end]

    def on_header_end() -> None:
        part["headers"][part["field"].lower()] = part["value"]
        part["field"] = part["value"] = b""

    def on_part_data(data: bytes, start: int, end: int) -> None:
        part["size"] += end - start
        if len(part["start"]) < n:
            part["start"] += data[start:min(end, start + n)]

    def on_part_end() -> None:
        _, options = parse_options_header(part["headers"].get(b"content-disposition", b""))
        if b"filename" in options:
            files.append((options[b"filename"].decode("utf-8", errors="replace"), part["start"][:n], part["size"]))

    parser = MultipartParser(boundary, dict(  # type: ignore[arg-type]
        on_part_begin=on_part_begin, on_header_field=on_header_field, on_header_value=on_header_value,
        on_header_end=on_header_end, on_part_data=on_part_data, on_part_end=on_part_end))
    parser.write(body)
    parser.finalize()
    return files


def _replay(body: bytes, receive: Callable) -> Callable:
    """An ASGI receive that hands the app `body` first (already read by the gate), then the connection's own."""
    sent = False

    async def replay() -> dict:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay
