"""Prompt notes with the embedded model's real CLIP tokenizer and vocabulary, and with tiny SDXL / SD3 / PixArt-Σ."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipelines.loading import ModelLoader
from pipelines.prompts import EMPTY_NOTE, prompt_notes, text_encoders, words
from pipelines.registry import MODELS, model_vocabulary

UNKNOWN_TAIL = " — it was trained on shapes, colours, sizes and positions only."


@pytest.fixture(scope="module")
def embedded():
    return ModelLoader(device="cpu").get("tiny-shapes")


@pytest.fixture(scope="module")
def vocabulary() -> frozenset[str]:
    return model_vocabulary("tiny-shapes")


def test_shipped_vocabulary_is_what_the_world_derives() -> None:
    from training.vocabulary import OUT, words as world_words

    shipped = Path(MODELS["tiny-shapes"].source) / MODELS["tiny-shapes"].vocabulary
    assert shipped == OUT
    assert json.loads(shipped.read_text())["words"] == world_words()
    assert model_vocabulary("tiny-shapes") == frozenset(world_words())
    assert model_vocabulary("sd-1.5") is None and model_vocabulary("some/hub-id") is None


def test_words_lowercase_and_drop_punctuation_and_numbers() -> None:
    assert words("A Red-circle, 3 dogs & 2x stars!  top_left") == ["a", "red", "circle", "dogs", "stars", "top", "left"]


def test_world_prompts_get_no_notes(embedded, vocabulary) -> None:
    for prompt in ("a large red circle in the center", "A drawing of a small blue star in the top-left corner.",
                   "a red square above a green heart on a white background", "an orange triangle to the right of a star"):
        assert prompt_notes(embedded, prompt, vocabulary=vocabulary) == [], prompt


def test_empty_prompt(embedded, vocabulary) -> None:
    assert prompt_notes(embedded, "", vocabulary=vocabulary) == [EMPTY_NOTE]
    assert prompt_notes(embedded, "  \n", vocabulary=vocabulary) == [EMPTY_NOTE]


def test_unknown_words_in_order_once_from_both_prompts(embedded, vocabulary) -> None:
    notes = prompt_notes(embedded, "a Dog next to a tree, a dog", "blurry, 4k", vocabulary=vocabulary)
    assert notes == ["The embedded model does not know: 'dog', 'next', 'tree', 'blurry'" + UNKNOWN_TAIL]
    assert prompt_notes(embedded, "a dog") == []  # no vocabulary, no vocabulary note


def test_many_unknown_words_are_cut_short(embedded, vocabulary) -> None:
    prompt = " ".join(f"word{chr(97 + i)}x" for i in range(12)).replace("word", "w")  # 12 words, no digits
    (note,) = prompt_notes(embedded, prompt, vocabulary=vocabulary)
    assert note.count("'") == 2 * 10 and ", …" + UNKNOWN_TAIL in note


def test_prompt_past_75_tokens_names_the_ignored_tail(embedded, vocabulary) -> None:
    assert text_encoders(embedded)[0].max_tokens == 75
    four_tokens = "a large red circle "  # 4 CLIP tokens
    assert prompt_notes(embedded, four_tokens * 18 + "a large red", vocabulary=vocabulary) == []  # exactly 75
    notes = prompt_notes(embedded, four_tokens * 18 + "a large red circle", vocabulary=vocabulary)
    assert notes == ["Prompt is 76 tokens; the text encoder reads only the first 75 — ignored: 'circle'"]
    notes = prompt_notes(embedded, "a small dog " + four_tokens * 20, vocabulary=vocabulary)
    assert notes[0] == "Prompt is 83 tokens; the text encoder reads only the first 75 — ignored: 'a large red circle a large red circle'"
    assert notes[1] == "The embedded model does not know: 'dog'" + UNKNOWN_TAIL


def test_long_negative_prompt_gets_its_own_note(embedded) -> None:
    (note,) = prompt_notes(embedded, "a red circle", "a large red circle " * 20)
    assert note.startswith("Negative prompt is 80 tokens; the text encoder reads only the first 75")


def test_sdxl_two_clips_give_one_note(tiny_loader) -> None:
    pipe = tiny_loader.get("sdxl")
    assert [e.kind for e in text_encoders(pipe)] == ["CLIP", "CLIP"]
    (note,) = prompt_notes(pipe, "x" * 80)  # the tiny CLIP tokenizer is byte-level: one token per character
    assert note == "Prompt is 80 tokens; the CLIP text encoders read only the first 75 — ignored: 'xxxxx'"


def test_sd3_clip_truncates_while_t5_reads_on(tiny_loader) -> None:
    pipe = tiny_loader.get("sd3")
    assert [(e.kind, e.max_tokens) for e in text_encoders(pipe)] == [("CLIP", 75), ("CLIP", 75), ("T5", 255)]
    (note,) = prompt_notes(pipe, "red " * 30)  # byte-level tiny CLIP: 3 tokens a word; word-level tiny T5: 1
    assert note.startswith("Prompt is 90 tokens; the CLIP text encoders read only the first 75")
    assert note.endswith("(the T5 text encoder reads all of it)")
    notes = prompt_notes(pipe, "red " * 300)
    assert len(notes) == 2 and notes[1].startswith("Prompt is 300 tokens; the T5 text encoder reads only the first 255")


def test_pixart_t5_reads_299_tokens(tiny_loader) -> None:
    pipe = tiny_loader.get("pixart_sigma")
    assert prompt_notes(pipe, "red " * 299) == []
    (note,) = prompt_notes(pipe, "red " * 299 + "blue circle")
    assert note == "Prompt is 301 tokens; the text encoder reads only the first 299 — ignored: 'blue circle'"


def test_without_a_loaded_pipeline_only_the_text_notes(vocabulary) -> None:
    assert prompt_notes(None, "") == [EMPTY_NOTE]
    assert prompt_notes(None, "a dog " * 50, vocabulary=vocabulary) == ["The embedded model does not know: 'dog'" + UNKNOWN_TAIL]
