"""Prompts before they are run: the prompt schedule (AUTOMATIC1111's [from:to:when] prompt editing) and the notes
shown under the prompt box (empty, longer than the text encoders read, outside a closed vocabulary, the schedule)."""

from __future__ import annotations

import bisect
import inspect
import re
from dataclasses import dataclass
from typing import Any

from pipelines.words import counted

EMPTY_NOTE = "Empty prompt: the model generates unconditionally (no text guidance)."
CLOSED_VOCABULARY = "it was trained on shapes, colours, sizes and positions only"  # the embedded model, the only one
MAX_WORDS_LISTED = 10  # unknown words named in a note; more are summarised as "…"
MAX_IGNORED_CHARS = 60  # of the ignored tail quoted in a note
MAX_SCHEDULE_STEPS = 1000  # steps a schedule's syntax is checked against when the run's step count is not given
_LITERAL_GROUP = re.compile(r"(?<!\\)\[[^:|\[\]]*(?<!\\)\]")  # [word] without ':' or '|', brackets not escaped
LITERAL_BRACKETS_NOTE = ("[word] without ':' is read as typed, brackets included (A1111's de-emphasis is not applied "
                         "here); [from:to:when] switches the prompt during the run")


# -- prompt schedule -------------------------------------------------------------------------------------------------

SCHEDULE_FORMS = "[from:to:when], [to:when] or [from::when]"
_NUMBER = re.compile(r"[0-9]+(?:\.[0-9]*)?|\.[0-9]+")


@dataclass(frozen=True)
class Segment:
    """A stretch of a prompt schedule: the text the encoder reads on loop iterations `first`..`last`."""

    first: int  # first loop iteration (0-based) that reads `text`
    last: int | None  # last one, inclusive; None: to the end of the run
    text: str  # the prompt with every [from:to:when] resolved for these iterations (escaped \[ \] as brackets)


@dataclass(frozen=True)
class _Edit:
    """One [from:to:when] of a prompt."""

    before: str  # `from` ("" for [to:when])
    after: str  # `to` ("" for [from::when])
    until: int  # `from` is read while the 1-based boundary step t <= until (A1111's `when` after conversion)


def _when(text: str, steps: int, where: str) -> int:
    """A1111's `when` -> a step count: a fraction below 1 is int(when * steps), a whole number is that step."""
    allowed = f"when is a fraction of the steps below 1 (such as 0.1) or a whole step number from 0 to {steps}"
    value = text.strip()
    if value.startswith("-"):
        raise ValueError(f"{where}: when {value!r} is negative; {allowed}")
    if not _NUMBER.fullmatch(value):
        raise ValueError(f"{where}: {value!r} is not a number; a prompt schedule is {SCHEDULE_FORMS} and {allowed}")
    number = float(value)
    if "." in value:
        if number >= 1:
            # A1111 1.6+ reads any number with a decimal point as a fraction (1.0 = the whole run), older versions
            # read 1.0 as step 1: refused rather than picking one of them silently.
            raise ValueError(f"{where}: when {value!r} has a decimal point but is not below 1; {allowed}")
        return int(number * steps)  # as A1111: float product, truncated (0.29 * 100 -> 28)
    if number > steps:
        raise ValueError(f"{where}: when {value!r} is past the run's {counted(steps, 'step')}; {allowed}")
    return int(number)


def _split_top(text: str, sep: str) -> list[str]:
    """`text` split at `sep` outside parentheses ("(a:1.2)" is one piece, as in A1111's grammar)."""
    parts, depth, start = [], 0, 0
    for k, c in enumerate(text):
        depth += (c == "(") - (c == ")")
        if c == sep and depth <= 0:
            parts.append(text[start:k])
            start = k + 1
    return parts + [text[start:]]


@dataclass(frozen=True)
class _Group:
    """A [...] of a prompt as typed."""

    body: str  # what the brackets hold, \\[ and \\] resolved
    start: int  # index of its '[' in the prompt
    end: int  # index of its ']'


def _scan(text: str, name: str) -> list[str | _Group]:
    """Plain text (escaped brackets resolved) and [...] groups, in order; ValueError on unbalanced or nested ones."""
    pieces: list[str | _Group] = []
    plain: list[str] = []
    k = 0
    while k < len(text):
        c = text[k]
        if c == "\\" and text[k + 1:k + 2] in ("[", "]"):  # \[ and \] are literal brackets
            plain.append(text[k + 1])
            k += 2
            continue
        if c == "]":
            raise ValueError(f"{name}: ']' at character {k + 1} closes no '['; a prompt schedule is {SCHEDULE_FORMS} "
                             f"(write \\] for a literal bracket)")
        if c != "[":
            plain.append(c)
            k += 1
            continue
        close, inner = k + 1, []
        while close < len(text) and text[close] != "]":
            if text[close] == "\\" and text[close + 1:close + 2] in ("[", "]"):
                inner.append(text[close + 1])
                close += 2
                continue
            if text[close] == "[":
                raise ValueError(f"{name}: '[' at character {close + 1} is inside the '[' at character {k + 1}; "
                                 f"nested brackets are not supported: write the schedules one after another")
            inner.append(text[close])
            close += 1
        if close == len(text):
            raise ValueError(f"{name}: the '[' at character {k + 1} is never closed; a prompt schedule is "
                             f"{SCHEDULE_FORMS} (write \\[ for a literal bracket)")
        pieces += ["".join(plain), _Group("".join(inner), k, close)]
        plain = []
        k = close + 1
    return pieces + ["".join(plain)]


def _parse(text: str, steps: int, name: str) -> list[str | _Edit]:
    """Plain text pieces and [from:to:when] edits of one prompt, in order; ValueError on malformed brackets."""
    pieces: list[str | _Edit] = []
    for piece in _scan(text, name):
        if isinstance(piece, str):
            pieces.append(piece)
            continue
        where = f"{name}: [{piece.body}] at character {piece.start + 1}"
        if "|" in piece.body:
            raise ValueError(f"{where}: A1111's alternation [a|b] is not supported; a prompt schedule is "
                             f"{SCHEDULE_FORMS}")
        parts = _split_top(piece.body, ":")
        if len(parts) == 1:  # [word]: A1111's de-emphasis, not applied here: read as typed
            pieces.append(f"[{piece.body}]")
        elif len(parts) > 3:
            raise ValueError(f"{where}: too many ':'; a prompt schedule is {SCHEDULE_FORMS}")
        else:
            before, after = (parts[0], parts[1]) if len(parts) == 3 else ("", parts[0])
            pieces.append(_Edit(before, after, _when(parts[-1], steps, where)))
    return pieces


def switch_at(text: str, when: str) -> str:
    """`text` with the `when` of its one [from:to:when] replaced by `when` (whatever was written there, a number or a
    placeholder such as WHEN); ValueError unless the prompt holds exactly one."""
    groups = [p for p in _scan(text, "prompt") if isinstance(p, _Group) and len(_split_top(p.body, ":")) in (2, 3)]
    if len(groups) != 1:
        raise ValueError(f"the prompt must hold exactly one prompt schedule {SCHEDULE_FORMS}, such as 'a large red "
                         f"[circle:triangle:0.5] in the center'; it holds {len(groups)}")
    group = groups[0]
    raw_when = _split_top(text[group.start + 1:group.end], ":")[-1]
    return text[:group.end - len(raw_when)] + when + text[group.end:]


def _text_at(pieces: list[str | _Edit], t: int) -> str:
    """The prompt at A1111's boundary step t (1-based): `from` while t <= until, `to` after."""
    return "".join(p if isinstance(p, str) else p.before if t <= p.until else p.after for p in pieces)


def schedule_segments(text: str, steps: int, name: str = "prompt") -> tuple[Segment, ...]:
    """The texts one prompt gives over a run of `steps` steps, in order (one Segment for a prompt without a schedule).

    Semantics of AUTOMATIC1111's prompt editing (modules/prompt_parser.py, get_learned_conditioning_prompt_schedules,
    and sd_samplers_cfg_denoiser.py, which reads the schedule with a 0-based model-call counter):

    - `[from:to:when]` reads `from`, then `to`; `[to:when]` adds `to`, `[from::when]` removes `from`.
    - when < 1 (written with a decimal point) is a fraction: w = int(when * steps); a whole number is the step w.
    - `from` is read on loop iterations 0..w (0-based: steps 1..w+1, one more than `when` says, as in A1111: its
      [a:b:5] reads b from the 7th step), and `to` from iteration w+1 on. w = 0 reads `to` from the start; w = steps
      reads `from` throughout.
    - Iterations count model calls, as A1111's counter does: Heun's 2N-1 iterations and PLMS's N+1 read the same
      schedule, and past iteration `steps` the last text goes on (A1111 would fall back to the first one there).

    Refused with a ValueError naming what is allowed: an unclosed '[' or a stray ']', nested brackets, alternation
    [a|b], more than two ':' before when, a `when` that is negative, not a number, a decimal >= 1 (A1111 versions
    disagree on those) or a step past `steps`. `[word]` without ':' (A1111's de-emphasis) is read as typed;
    `\\[` and `\\]` are literal brackets.
    """
    pieces = _parse(text, steps, name)
    edits = [p for p in pieces if isinstance(p, _Edit)]
    if not edits:
        return (Segment(0, None, "".join(pieces)),)
    # A1111's boundaries: `steps` and every edit's step from 1 on; boundary t's text serves iterations up to t.
    bounds = sorted({steps} | {e.until for e in edits if e.until >= 1})
    segments: list[Segment] = []
    first = 0
    for t in bounds:
        text_t = _text_at(pieces, t)
        if segments and segments[-1].text == text_t:
            segments[-1] = Segment(segments[-1].first, t, text_t)
        else:
            segments.append(Segment(first, t, text_t))
        first = t + 1
    return (*segments[:-1], Segment(segments[-1].first, None, segments[-1].text))


@dataclass(frozen=True)
class PromptSchedule:
    """What a run's text encoder reads at each loop iteration: the prompt and the negative prompt with their
    [from:to:when] resolved (schedule_segments), as the distinct (prompt, negative prompt) pairs to encode once."""

    steps: int  # num_inference_steps the `when`s were read against
    prompt: tuple[Segment, ...]  # the prompt's segments, in order
    negative_prompt: tuple[Segment, ...]  # the negative prompt's segments, in order
    pairs: tuple[tuple[str, str], ...]  # distinct (prompt, negative prompt) texts, in order of first use
    starts: tuple[tuple[int, int], ...]  # (first loop iteration, index into pairs), ascending from iteration 0

    @classmethod
    def parse(cls, prompt: str, negative_prompt: str, steps: int) -> PromptSchedule:
        """Both prompts' schedules over `steps` steps; ValueError naming the prompt and what is allowed if malformed."""
        pos = schedule_segments(prompt, steps, "prompt")
        neg = schedule_segments(negative_prompt, steps, "negative_prompt")
        firsts = sorted({s.first for s in pos} | {s.first for s in neg})
        pairs: list[tuple[str, str]] = []
        starts: list[tuple[int, int]] = []
        for first in firsts:
            pair = (_segment_at(pos, first).text, _segment_at(neg, first).text)
            if pair not in pairs:
                pairs.append(pair)
            index = pairs.index(pair)
            if not starts or starts[-1][1] != index:
                starts.append((first, index))
        return cls(steps, pos, neg, tuple(pairs), tuple(starts))

    @property
    def scheduled(self) -> bool:
        """Whether the texts change during the run."""
        return len(self.starts) > 1

    def pair_index(self, i: int) -> int:
        """Index into `pairs` of the texts read at loop iteration i (0-based)."""
        return self.starts[bisect.bisect_right([s for s, _ in self.starts], i) - 1][1]

    def describe(self) -> list[str]:
        """One line per prompt that changes, e.g. "steps 1–3: 'a red circle'; steps 4–20: 'a red triangle'"."""
        lines = []
        for label, segments in (("Prompt", self.prompt), ("Negative prompt", self.negative_prompt)):
            segments = [s for s in segments if s.first < self.steps]  # later ones: Heun's extra iterations only
            if len(segments) > 1:
                lines.append(f"{label} schedule: " + "; ".join(
                    f"{_steps_label(s, self.steps)}: '{_shown(s.text)}'" for s in segments))
        return lines


def _segment_at(segments: tuple[Segment, ...], i: int) -> Segment:
    return next((s for s in segments if s.last is None or i <= s.last), segments[-1])


def _steps_label(segment: Segment, steps: int) -> str:
    last = steps if segment.last is None else min(segment.last + 1, steps)
    first = segment.first + 1
    return f"step {first}" if first == last else f"steps {first}–{last}"


def _shown(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= MAX_IGNORED_CHARS else text[: MAX_IGNORED_CHARS - 1].rstrip() + "…"


# -- notes -------------------------------------------------------------------------------------------------------------


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


def prompt_notes(pipe: Any | None, prompt: str, negative_prompt: str = "", vocabulary: frozenset[str] | None = None,
                 steps: int | None = None) -> list[str]:
    """Short user-facing notes on a prompt for `pipe`, in display order; [] when there is nothing to say.

    pipe None (the model is not loaded yet) skips the token-length notes, which need its tokenizers.

    vocabulary: the closed set of words the model was trained on (pipelines.registry.model_vocabulary; only the
    embedded model has one), checked against both prompts with words().

    steps: the run's num_inference_steps; a prompt schedule ([from:to:when]) is shown step by step against it, and
    its errors (the same ValueError text a request gets) become a note. None checks the syntax only.
    """
    notes = []
    try:
        schedule = PromptSchedule.parse(prompt, negative_prompt, steps or MAX_SCHEDULE_STEPS)
    except ValueError as e:
        notes.append(str(e))
        schedule = None
    if steps and schedule is not None:
        notes += schedule.describe()
    if schedule is not None and (_LITERAL_GROUP.search(prompt) or _LITERAL_GROUP.search(negative_prompt)):
        notes.append(LITERAL_BRACKETS_NOTE)
    # Length notes on what the encoder reads: each distinct text of a schedule (brackets resolved), with its steps.
    for label, typed, segments in (("Prompt", prompt, schedule and schedule.prompt),
                                   ("Negative prompt", negative_prompt, schedule and schedule.negative_prompt)):
        texts = {s.text: s for s in segments} if segments else {typed: None}
        if label == "Prompt" and not any(t.strip() for t in texts):
            notes.append(EMPTY_NOTE)
        for text, segment in texts.items():
            if text.strip():
                shown = f"{label} ({_steps_label(segment, steps)})" if steps and len(texts) > 1 else label
                notes += _length_notes(pipe, text, shown)
    if vocabulary is not None:
        unknown = list(dict.fromkeys(w for w in words(prompt) + words(negative_prompt) if w not in vocabulary))
        if unknown:
            listed = ", ".join(f"'{w}'" for w in unknown[:MAX_WORDS_LISTED])
            more = ", …" if len(unknown) > MAX_WORDS_LISTED else ""
            notes.append(f"The embedded model does not know: {listed}{more} — {CLOSED_VOCABULARY}.")
    return notes
