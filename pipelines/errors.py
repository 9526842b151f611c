"""Messages safe to show a client: one line, no absolute server paths, no library internals.

Bad input (ValueError) is the user's to fix, so its text is kept, minus paths; anything else is a server fault, which
the caller logs in full and the client hears of only by kind ("out of memory", "could not write files").
"""

from __future__ import annotations

import os
import re
import site
import sys
import sysconfig
import tempfile
from pathlib import Path
from typing import Iterable

from pipelines.words import counted

MAX_MESSAGE_CHARS = 300  # a client message is cut here (a refusal that echoes input stays short)
MAX_SHOWN_CHARS = 60  # user-supplied values quoted in a refusal are cut here

ROOT = Path(__file__).resolve().parent.parent
# diffusers' tail on load errors; it points at a stack trace the client never sees.
_STACKTRACE_HINT = "Please check out the root cause in the stacktrace above."
# An absolute POSIX path of two or more parts, at the start or after a space, quote, bracket, '=' or ':'.
_ABS_PATH = re.compile(r"(?<![\w.~/>-])/(?:[^\s'\"`()\[\]{}<>,;:/]+/)+([^\s'\"`()\[\]{}<>,;:/]*)")


class NonFiniteLatents(ValueError):
    """The denoising loop made NaN or infinite latents, which decode to a black image; the run stops there.

    A ValueError, so every handler that shows bad input as one client-safe line shows this too: the fix is the
    user's (fewer steps, another scheduler). The message names the step, the scheduler and what to try.
    """

    def __init__(self, step: int, num_steps: int, scheduler: str, repeated_timestep: int | None = None,
                 fewer_steps: int | None = None, alternative: str | None = None) -> None:
        self.step = step  # 1-based loop step whose scheduler output was the first not finite
        self.num_steps = num_steps  # steps in the run's schedule
        self.scheduler = scheduler  # registry key (or class name) of the scheduler that stepped
        why = "" if repeated_timestep is None else f" (its schedule repeats timestep {repeated_timestep} there)"
        tries = []
        if num_steps > 1:
            tries.append(counted(fewer_steps, "step") if fewer_steps else "fewer steps")
        if alternative:
            tries.append(f"another scheduler such as {alternative}")
        super().__init__(
            f"the latents became NaN or infinite at step {step} of {num_steps} with scheduler {scheduler!r}{why}, "
            f"so the run stopped instead of making a black image; try {' or '.join(tries) or 'other settings'}")


def shown(value: object, limit: int = MAX_SHOWN_CHARS) -> str:
    """repr(value), cut to `limit` characters: a refusal never echoes a 10 MB prompt back."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _prefixes(outputs_dir: str | os.PathLike | None, extra: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
    """(absolute prefix, what the client sees instead), longest first so the most specific one wins."""
    pairs: list[tuple[str, str]] = list(extra)
    if outputs_dir is not None:
        pairs.append((str(Path(outputs_dir).resolve()), "outputs"))
        pairs.append((os.path.abspath(outputs_dir), "outputs"))
    libs = {*site.getsitepackages(), site.getusersitepackages(), sysconfig.get_paths()["purelib"],
            sysconfig.get_paths()["stdlib"]}
    pairs += [(p, "<python>") for p in libs if p]
    pairs += [(str(ROOT), "<app>"), (sys.prefix, "<python>"), (tempfile.gettempdir(), "<tmp>"),
              (os.path.expanduser("~"), "~")]
    pairs = [(p.rstrip("/"), r) for p, r in pairs if p and p not in ("/", ".")]
    return sorted(dict(pairs).items(), key=lambda pr: -len(pr[0]))


def scrub_paths(text: str, outputs_dir: str | os.PathLike | None = None,
                extra: Iterable[tuple[str, str]] = ()) -> str:
    """`text` with server paths replaced: the outputs folder -> "outputs", the app -> "<app>", Python's libraries
    -> "<python>", temp -> "<tmp>", home -> "~", and any other absolute path -> "…/<its last part>"."""
    for prefix, replacement in _prefixes(outputs_dir, extra):
        text = text.replace(prefix, replacement)
    return _ABS_PATH.sub(lambda m: "…/" + m.group(1), text)


def one_line(text: str, limit: int = MAX_MESSAGE_CHARS) -> str:
    """Whitespace collapsed to single spaces, diffusers' stack-trace pointer dropped, and cut to at most `limit`
    characters on a whole word: after the last full sentence when that keeps at least half the limit, else at the
    last space, with "…" for what was left out (never "To…", half a word)."""
    text = " ".join(text.replace(_STACKTRACE_HINT, "").split())
    if len(text) <= limit:
        return text
    head = text[:limit]
    sentence = head.rfind(". ")
    if sentence >= limit // 2:
        return head[: sentence + 1]
    space = head[: limit - 1].rfind(" ")
    return (head[:space] if space > 0 else head[: limit - 1]).rstrip(" ,;:(") + "…"


def client_message(error: BaseException, outputs_dir: str | os.PathLike | None = None) -> str:
    """One line for the client about `error`: a ValueError's own text (bad input) without server paths; for anything
    else only its kind, since its text is the server's business (log the exception itself)."""
    if isinstance(error, ValueError) and not isinstance(error, UnicodeError):
        text = one_line(scrub_paths(str(error), outputs_dir)).rstrip(" .")
        return text or "The request was refused."
    if isinstance(error, MemoryError) or type(error).__name__ == "OutOfMemoryError":  # torch.OutOfMemoryError
        return "Generation failed: the server ran out of memory; try a smaller size or fewer steps."
    if isinstance(error, TimeoutError):
        return "Generation failed: the run took too long and was stopped."
    if isinstance(error, OSError):
        reason = f" ({error.strerror})" if error.strerror else ""
        return f"Generation failed: the server could not read or write its files{reason}."
    return f"Generation failed with an internal error ({type(error).__name__}); the server has logged it."
