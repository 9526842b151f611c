"""PNG info: the settings an image was made with, as build_request's keyword arguments.

Two sources, both parsed in memory: the PNG text chunks a run leaves (`request`, this playground's request as JSON,
preferred; `parameters`, AUTOMATIC1111's text, which A1111 itself writes too: pipelines/outputs.py a1111_parameters),
and a parameters text pasted on its own. An A1111 parameters text looks like

    a red circle in the center
    Negative prompt: blue
    Steps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 42, Size: 64x64, Model: tiny-shapes

Both readers return a dict with `source` ("request" or "parameters"), the settings they found under build_request's
names (prompt, negative_prompt, model, scheduler, num_inference_steps, guidance_scale, seed, width, height,
guidance, guidance_params, num_images_per_prompt) and `notes`: one line per thing read but not used (a key this
playground has no setting for, a sampler it does not offer). A setting the text does not name is left out, so the
caller keeps its own value. Anything that is not a PNG or a parameters text raises a ValueError saying what is read.
"""

from __future__ import annotations

import json
import re
import zlib
from typing import Any

from guidance.registry import METHODS
from pipelines.errors import shown
from pipelines.requests import number, whole_number
from pipelines.schedulers import SCHEDULERS
from pipelines.types import MAX_IMAGES_PER_PROMPT, MAX_SIDE, MAX_STEPS, GenerationRequest

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
MAX_PNG_BYTES = 2**20  # the largest file read: 1 MB (Gradio's "1mb", the page's upload bound)
MAX_TEXT_BYTES = 256 * 2**10  # a text chunk (inflated) or a pasted text past this is refused
SETTINGS = ("prompt", "negative_prompt", "model", "scheduler", "num_inference_steps", "guidance_scale", "seed", "width",
            "height", "guidance", "guidance_params", "num_images_per_prompt")
EXAMPLE = ("a red circle in the center\nNegative prompt: blue\nSteps: 20, Sampler: DPM++ 2M, Schedule type: Karras, "
           "CFG scale: 7, Seed: 42, Size: 64x64, Model: tiny-shapes")
WHAT_IT_LOOKS_LIKE = ("an AUTOMATIC1111 parameters text is the prompt, an optional 'Negative prompt: …' line, then "
                      "one line of settings such as 'Steps: 20, Sampler: DPM++ 2M, CFG scale: 7, Seed: 42, Size: "
                      "512x512'")
# Keys of a settings line that count as A1111's: a line with none of them is not a parameters text.
CORE_KEYS = ("Steps", "Sampler", "CFG scale", "Seed", "Size")
# Settings this playground reads; anything else on the line is ignored with a note.
READ_KEYS = (*CORE_KEYS, "Schedule type", "Model", "Guidance", "CFG Rescale phi", "Batch size", "Batch pos")
# A1111 schedule types that leave a sampler's own spacing (no note needed).
PLAIN_SCHEDULES = ("", "automatic", "uniform")

# Adapted from AUTOMATIC1111 stable-diffusion-webui 1.10, modules/infotext_utils.py (re_param_code): `Key: value`
# pairs separated by commas, a value optionally "quoted" (with \" escapes) when it holds commas itself.
_PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
_SIZE = re.compile(r"^\s*(\d+)\s*x\s*(\d+)\s*$")


# -- PNG chunks ----------------------------------------------------------------------------------------------------


def png_text(data: bytes) -> dict[str, str]:
    """The text chunks (tEXt, zTXt, iTXt) of a PNG held in memory, keyword -> text (the first of each keyword).
    Pixels are never decoded; every chunk's CRC is checked; a compressed chunk inflates to at most MAX_TEXT_BYTES."""
    if not isinstance(data, (bytes, bytearray)):
        raise ValueError(f"PNG info reads the bytes of a PNG file, got {type(data).__name__}")
    if len(data) > MAX_PNG_BYTES:
        raise ValueError(f"the file is {len(data)} bytes; PNG info reads PNGs of at most {MAX_PNG_BYTES} bytes (1 MB)")
    if not data.startswith(PNG_SIGNATURE):
        raise ValueError(f"not a PNG file ({_kind(data)}); PNG info reads PNG images saved by this playground or by "
                         "AUTOMATIC1111")
    texts: dict[str, str] = {}
    pos = len(PNG_SIGNATURE)
    while pos < len(data):
        if pos + 12 > len(data):
            raise ValueError("the PNG is truncated (a chunk header is cut off)")
        length = int.from_bytes(data[pos:pos + 4], "big")
        kind, end = bytes(data[pos + 4:pos + 8]), pos + 8 + length
        if end + 4 > len(data):
            raise ValueError(f"the PNG is truncated (its {kind.decode('latin-1')!r} chunk is cut off)")
        body = bytes(data[pos + 8:end])
        if zlib.crc32(kind + body) != int.from_bytes(data[end:end + 4], "big"):
            raise ValueError(f"the PNG is damaged (its {kind.decode('latin-1')!r} chunk fails its checksum)")
        if kind == b"IEND":
            break
        if kind in (b"tEXt", b"zTXt", b"iTXt"):
            keyword, text = _text_chunk(kind, body)
            texts.setdefault(keyword, text)
        pos = end + 4
    return texts


def _text_chunk(kind: bytes, body: bytes) -> tuple[str, str]:
    """(keyword, text) of one tEXt / zTXt / iTXt chunk (PNG spec, 11.3.4)."""
    keyword, _, rest = body.partition(b"\0")
    if kind == b"tEXt":
        return keyword.decode("latin-1"), rest.decode("latin-1")
    if kind == b"zTXt":  # compression method byte (0 = zlib), then the compressed text
        return keyword.decode("latin-1"), _inflate(rest[1:]).decode("latin-1")
    # iTXt: compression flag, method, language tag \0, translated keyword \0, UTF-8 text
    compressed = rest[:1] == b"\x01"
    _language, _, rest = rest[2:].partition(b"\0")
    _translated, _, text = rest.partition(b"\0")
    return keyword.decode("latin-1"), (_inflate(text) if compressed else text).decode("utf-8", errors="replace")


def _inflate(data: bytes) -> bytes:
    inflater = zlib.decompressobj()
    try:
        out = inflater.decompress(data, MAX_TEXT_BYTES)
    except zlib.error:
        raise ValueError("the PNG is damaged (a compressed text chunk does not inflate)") from None
    if inflater.unconsumed_tail:
        raise ValueError(f"a compressed text chunk of the PNG inflates past {MAX_TEXT_BYTES} bytes")
    return out


def _kind(data: bytes) -> str:
    """What a file that is not a PNG seems to be, for the refusal."""
    if data.startswith(b"\xff\xd8\xff"):
        return "it is a JPEG; AUTOMATIC1111 keeps a JPEG's parameters in EXIF: save it as PNG"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "it is a WebP; AUTOMATIC1111 keeps a WebP's parameters in EXIF: save it as PNG"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "it is a GIF"
    if not data:
        return "it is empty"
    return "it does not start with the PNG signature"


# -- readers -------------------------------------------------------------------------------------------------------


def read_png_info(data: bytes) -> dict[str, Any]:
    """The settings a PNG was made with: its `request` chunk (this playground's request as JSON) when it is there
    and valid, else its `parameters` chunk (AUTOMATIC1111's text); ValueError when it is not a PNG or carries
    neither."""
    texts = png_text(data)
    notes: list[str] = []
    if "request" in texts:
        try:
            return parse_request(texts["request"])
        except ValueError as e:
            if "parameters" not in texts:
                raise ValueError(f"this PNG's request chunk cannot be read: {e}") from None
            notes.append(f"its request chunk cannot be read ({e}); read its parameters text instead")
    if "parameters" in texts:
        info = parse_parameters(texts["parameters"])
        return info | {"notes": notes + info["notes"]}
    raise ValueError("this PNG carries no generation settings (no 'parameters' or 'request' text chunk): it was not "
                     "saved by this playground or AUTOMATIC1111, or its metadata was removed")


def parse_request(text: str) -> dict[str, Any]:
    """The settings of a `request` chunk: GenerationRequest.to_dict() plus the seed used, as save_image writes it.
    Validated by GenerationRequest itself; a `branch` (an Explain-lab branch) is left out with a note."""
    try:
        data = json.loads(text)
    except (ValueError, RecursionError):
        raise ValueError("it is not JSON") from None
    if not isinstance(data, dict):
        raise ValueError(f"it is JSON {type(data).__name__}, not an object")
    fields = {k: data[k] for k in SETTINGS if k in data}
    if "prompt" not in fields:
        raise ValueError("it has no prompt")
    notes = []
    if data.get("branch") is not None:
        notes.append(f"the image is a branch of an Explain-lab run (branch {data['branch']!r}); these settings make "
                     "the run it branched from")
    if isinstance(fields.get("guidance_params"), dict):
        fields["guidance_params"] = dict(fields["guidance_params"])
    try:
        request = GenerationRequest(**fields)
    except (TypeError, ValueError) as e:
        raise ValueError(str(e)) from None
    settings = {k: v for k, v in request.to_dict().items() if k in SETTINGS}
    return {"source": "request", **settings, "num_images_per_prompt": request.num_images_per_prompt,
            "notes": notes}


def parse_parameters(text: str) -> dict[str, Any]:
    """The settings of an AUTOMATIC1111 parameters text (module docstring). Samplers are matched by A1111 label
    (pipelines/schedulers.py); "Schedule type: Karras" picks the Karras variant; keys without a setting here are
    ignored with a note. ValueError, saying what a parameters text looks like, when `text` is not one."""
    if not isinstance(text, str):
        raise ValueError(f"a parameters text must be text, got {type(text).__name__}")
    if len(text) > MAX_TEXT_BYTES:
        raise ValueError(f"the text is {len(text)} characters; a parameters text here is at most {MAX_TEXT_BYTES}")
    *lines, last = text.strip().replace("\r\n", "\n").split("\n")
    pairs = _PARAM.findall(last)
    keys = {k.strip() for k, _ in pairs}
    if len(pairs) < 3 or not keys & set(CORE_KEYS):
        raise ValueError(f"not a parameters text: {WHAT_IT_LOOKS_LIKE}")
    prompt, negative, in_negative = [], [], False
    for line in lines:
        if line.startswith("Negative prompt:"):
            in_negative, line = True, line[len("Negative prompt:"):]
        (negative if in_negative else prompt).append(line.strip())
    values: dict[str, str] = {}
    for key, value in pairs:
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] == '"':
            try:
                value = json.loads(value)  # A1111 quotes with json.dumps
            except ValueError:
                value = value[1:-1]
        values.setdefault(key.strip(), str(value))

    out: dict[str, Any] = {"source": "parameters", "prompt": "\n".join(prompt), "negative_prompt": "\n".join(negative)}
    notes: list[str] = []
    if "Steps" in values:
        out["num_inference_steps"] = _ranged("Steps", whole_number("Steps", values["Steps"]), 1, MAX_STEPS)
    if "CFG scale" in values:
        scale = number("CFG scale", values["CFG scale"])
        if scale < 0:
            raise ValueError(f"CFG scale must be a number >= 0, got {shown(values['CFG scale'])}")
        out["guidance_scale"] = scale
    if "Seed" in values:
        out["seed"] = _ranged("Seed", whole_number("Seed", values["Seed"]), 0, 2**63 - 1)
    if "Size" in values:
        size = _SIZE.match(values["Size"])
        if size is None:
            raise ValueError(f"Size must be WIDTHxHEIGHT such as 512x768, got {shown(values['Size'])}")
        out["width"] = _ranged("Size (width)", int(size[1]), 1, MAX_SIDE)
        out["height"] = _ranged("Size (height)", int(size[2]), 1, MAX_SIDE)
    if values.get("Model"):
        out["model"] = values["Model"]
    if "Batch size" in values:
        batch = _ranged("Batch size", whole_number("Batch size", values["Batch size"]), 1, MAX_IMAGES_PER_PROMPT)
        if "Batch pos" in values:  # one image of a batch, its Seed its own (seed + pos): made alone, as our request is
            out["num_images_per_prompt"] = 1
            notes.append(f"the image is number {values['Batch pos']} of a batch of {batch}; its own seed makes it "
                         "alone (set the batch size to make the rest)")
        else:
            out["num_images_per_prompt"] = batch
    if "Sampler" in values:
        key, note = scheduler_for(values["Sampler"], values.get("Schedule type", ""))
        if key is not None:
            out["scheduler"] = key
        if note:
            notes.append(note)
    elif values.get("Schedule type", "").lower() not in PLAIN_SCHEDULES:
        notes.append(f"Schedule type {values['Schedule type']!r} comes without a sampler; ignored")
    out["guidance"], out["guidance_params"] = _guidance(values)

    ignored = [k for k in values if k not in READ_KEYS]
    if ignored:
        notes.append(f"ignored (no such setting here): {', '.join(ignored)}")
    if "Stopped at step" in values:
        notes.append(f"the run was stopped at step {values['Stopped at step']}; generating again runs every step")
    return out | {"notes": notes}


def _ranged(name: str, value: int, low: int, high: int) -> int:
    if not low <= value <= high:
        raise ValueError(f"{name} must be a whole number from {low} to {high}, got {value}")
    return value


def scheduler_for(sampler: str, schedule_type: str = "") -> tuple[str | None, str | None]:
    """(registry key, note) for an A1111 sampler label and schedule type: "DPM++ 2M" with "Karras" is dpmpp_2m_karras,
    as the older single label "DPM++ 2M Karras" is. Labels are unique per schedule kind except "Euler", which names
    both euler and flow_euler: the discrete one is returned and the caller picks the one that fits its model. A
    sampler not offered here gives (None, a note that lists the offered labels)."""
    by_label: dict[str, str] = {}
    for spec in SCHEDULERS.values():
        by_label.setdefault(spec.label.lower(), spec.key)
    label, schedule = sampler.strip(), schedule_type.strip()
    key = by_label.get(label.lower())
    if key is None:
        offered = ", ".join(dict.fromkeys(s.label for s in SCHEDULERS.values()))
        return None, f"sampler {shown(label)} is not offered here ({offered}); the model's own scheduler is used"
    if schedule.lower() == "karras":
        karras = by_label.get(f"{label} karras".lower())
        if karras is not None:
            return karras, None
        if SCHEDULERS[key].overrides.get("use_karras_sigmas"):
            return key, None
        return key, f"{label} with the Karras schedule is not offered here; {key} runs its own schedule"
    if schedule.lower() not in PLAIN_SCHEDULES:
        return key, f"schedule type {shown(schedule)} is not offered here; {key} runs its own schedule"
    return key, None


def _guidance(values: dict[str, str]) -> tuple[str, dict[str, float]]:
    """The guidance method and its parameters: this playground's `Guidance: rescale guidance_rescale=0.7`, or the
    "CFG Rescale phi" of A1111's CFG-rescale extension; plain CFG otherwise (A1111's own)."""
    text = values.get("Guidance", "").strip()
    if not text:
        phi = values.get("CFG Rescale phi")
        if phi is not None and number("CFG Rescale phi", phi) > 0:
            return "rescale", {"guidance_rescale": number("CFG Rescale phi", phi)}
        return "cfg", {}
    method, *assignments = text.split()
    if method not in METHODS:
        raise ValueError(f"Guidance {shown(method)} is not a method here; choose one of: {', '.join(METHODS)}")
    params: dict[str, float] = {}
    for item in assignments:
        name, eq, value = item.partition("=")
        if not eq:
            raise ValueError(f"Guidance parameters must be name=value, got {shown(item)}")
        params[name] = number(f"Guidance parameter {name!r}", value)
    GenerationRequest(prompt="", guidance=method, guidance_params=params)  # the registry checks names and ranges
    return method, params

