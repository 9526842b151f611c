"""Notes on a prompt before it is run: empty, longer than the text encoders read, or outside a closed vocabulary."""

from __future__ import annotations

import inspect
import re
from dataclasses import dataclass
from typing import Any

EMPTY_NOTE = "Empty prompt: the model generates unconditionally (no text guidance)."
CLOSED_VOCABULARY = "it was trained on shapes, colours, sizes and positions only"  # the embedded model, the only one
MAX_WORDS_LISTED = 10  # unknown words named in a note; more are summarised as "…"
MAX_IGNORED_CHARS = 60  # of the ignored tail quoted in a note


def words(text: str) -> list[str]:
    """Lower-case words: runs of letters; punctuation splits, numbers and words with digits are dropped.
    Same rule as training/vocabulary.tokenize, which builds the vocabulary these words are checked against."""
    return [w for w in re.findall(r"[^\W_]+", text.lower()) if w.isalpha()]


@dataclass(frozen=True)
class TextEncoder:
    """One text encoder of a pipeline as a prompt sees it."""

    kind: str  # "CLIP", "T5", or the encoder's class name
    tokenizer: Any  # its transformers tokenizer
    max_tokens: int  # prompt tokens it reads, special tokens (<|startoftext|>, </s>) excluded


def text_encoders(pipe: Any) -> list[TextEncoder]:
    """The pipeline's text encoders in order (tokenizer, tokenizer_2, tokenizer_3).

    CLIP reads model_max_length (77) minus its two special tokens. Other tokenizers (T5) read the pipeline's
    max_sequence_length, the __call__ default our families pass too (PixArt-Σ 300, SD3 256), minus </s>.
    """
    call_max = inspect.signature(type(pipe).__call__).parameters.get("max_sequence_length")
    found = []
    for suffix in ("", "_2", "_3"):
        tokenizer = getattr(pipe, "tokenizer" + suffix, None)
        if tokenizer is None:
            continue
        encoder_name = type(getattr(pipe, "text_encoder" + suffix, None)).__name__
        kind = "CLIP" if "CLIP" in encoder_name else "T5" if "T5" in encoder_name else encoder_name
        if "CLIP" in type(tokenizer).__name__ or call_max is None or call_max.default is inspect.Parameter.empty:
            max_length = tokenizer.model_max_length
        else:
            max_length = call_max.default
        special = len(tokenizer("").input_ids)
        found.append(TextEncoder(kind, tokenizer, max_length - special))
    return found


def _tokens(tokenizer: Any, text: str) -> tuple[int, list[tuple[int, int]] | None]:
    """(token count without special tokens, character offsets per token or None when the tokenizer has none)."""
    try:
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
        return len(enc.input_ids), [tuple(o) for o in enc["offset_mapping"]]
    except (NotImplementedError, KeyError, TypeError, ValueError):  # slow tokenizers have no offsets
        return len(tokenizer(text, add_special_tokens=False, verbose=False).input_ids), None


def _ignored_text(tokenizer: Any, text: str, limit: int, offsets: list[tuple[int, int]] | None) -> str:
    """The part of `text` past the first `limit` tokens, as typed (or decoded, without offsets), shortened."""
    if offsets is not None:
        tail = text[offsets[limit][0]:]
    else:
        tail = tokenizer.decode(tokenizer(text, add_special_tokens=False, verbose=False).input_ids[limit:])
    tail = " ".join(tail.split())
    return tail if len(tail) <= MAX_IGNORED_CHARS else tail[: MAX_IGNORED_CHARS - 1].rstrip() + "…"


def _length_notes(pipe: Any, text: str, label: str) -> list[str]:
    """One note per encoder kind that truncates `text` (SDXL's two CLIPs truncate alike: one note)."""
    if pipe is None:  # the model is not loaded yet: its tokenizers are unknown, so no length notes
        return []
    encoders = text_encoders(pipe)
    counts = {}
    for enc in encoders:
        if enc.kind not in counts:
            counts[enc.kind] = (enc, *_tokens(enc.tokenizer, text))
    kinds = [e.kind for e in encoders]
    notes = []
    for kind, (enc, n, offsets) in counts.items():
        if n <= enc.max_tokens:
            continue
        if len(encoders) == 1:
            who = "the text encoder reads"
        else:
            who = f"the {kind} text encoder{'s read' if kinds.count(kind) > 1 else ' reads'}"
        note = (f"{label} is {n} tokens; {who} only the first {enc.max_tokens} — ignored: "
                f"'{_ignored_text(enc.tokenizer, text, enc.max_tokens, offsets)}'")
        readers = [k for k, (e, m, _) in counts.items() if k != kind and m <= e.max_tokens]
        if readers:
            note += f" (the {' and '.join(readers)} text encoder reads all of it)"
        notes.append(note)
    return notes


def prompt_notes(pipe: Any | None, prompt: str, negative_prompt: str = "", vocabulary: frozenset[str] | None = None) -> list[str]:
    """Short user-facing notes on a prompt for `pipe`, in display order; [] when there is nothing to say.

    pipe None (the model is not loaded yet) skips the token-length notes, which need its tokenizers.

    vocabulary: the closed set of words the model was trained on (pipelines.registry.model_vocabulary; only the
    embedded model has one), checked against both prompts with words().
    """
    notes = []
    if not prompt.strip():
        notes.append(EMPTY_NOTE)
    else:
        notes += _length_notes(pipe, prompt, "Prompt")
    if negative_prompt.strip():
        notes += _length_notes(pipe, negative_prompt, "Negative prompt")
    if vocabulary is not None:
        unknown = list(dict.fromkeys(w for w in words(prompt) + words(negative_prompt) if w not in vocabulary))
        if unknown:
            listed = ", ".join(f"'{w}'" for w in unknown[:MAX_WORDS_LISTED])
            more = ", …" if len(unknown) > MAX_WORDS_LISTED else ""
            notes.append(f"The embedded model does not know: {listed}{more} — {CLOSED_VOCABULARY}.")
    return notes
