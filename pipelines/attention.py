"""Which word drew where: per-word cross-attention maps of one run, as DAAM makes them (Tang et al. 2023, "What the
DAAM: Interpreting Stable Diffusion Using Cross Attention", arXiv:2210.04885).

At every cross-attention layer and step, the probabilities with which each image position attends to each text token
(softmax(q kᵀ / √d) of the conditional prediction, first image of the batch) are averaged over the heads, summed over
the tokens of each word (BPE pieces, sentencepiece pieces), upsampled to the latent grid and summed over the layers:
one (words, h, w) map per step. Start, end and padding tokens and punctuation belong to no word and are left out.

Where the maps come from, per family:
- SD, SDXL (UNet) and PixArt-Σ (DiT, T5 tokens, its padding masked as the model masks it): every cross-attention layer;
- SD3: the image-to-text part of the joint attention of every MMDiT block: the probabilities, under the joint softmax
  over image and text keys, that image queries give to the text keys (CLIP positions, then T5's).

The probes are attention processors installed on those layers for one run and removed after (`probing`), as
Family.perturbed_pass installs PAG's. Each wraps the layer's own processor, which still computes the layer's
output, so the run makes the same image as without them; the probe only reads the layer's projections again.
"""

from __future__ import annotations

import math
import re
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Collection, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention
from diffusers.utils import is_bs4_available, is_ftfy_available

from pipelines.families import Family
from pipelines.observers import Observer
from pipelines.types import StepEvent

# A word: letters and digits, with inner apostrophes and hyphens ("don't", "top-left" are one word each).
WORD = re.compile(r"\w+(?:['’-]\w+)*")
FAMILIES = ("sd", "sdxl", "pixart_sigma", "sd3")  # the families whose text→image attention is mapped here
JOINT_CHUNK = 1 << 22  # SD3: scores computed for this many (query × key × head) entries at a time


@dataclass(frozen=True)
class Word:
    """One word of the text the encoder read, and the text-sequence positions of its tokens."""

    text: str  # as written in that text
    index: int  # 0-based position among its words
    tokens: tuple[int, ...]  # positions in the text sequence the denoiser attends to (every encoder's, for SD3)


def encoded_text(pipe: Any, family: Family, prompt: str) -> str:
    """The text the family's encoder tokenizes for `prompt`: the prompt itself, or for PixArt-Σ the caption its
    pipeline cleans first (PixArtSigmaPipeline._text_preprocessing with clean_caption=True, as families.py encodes;
    lower-cased when bs4 or ftfy are missing)."""
    if family.key == "pixart_sigma":  # the pipeline's own step, not a copy; without bs4 and ftfy it lower-cases
        clean = is_bs4_available() and is_ftfy_available()  # (asked first: it would warn again, as encode does)
        return pipe._text_preprocessing(prompt, clean_caption=clean)[0]
    return prompt


def _tokenizers(pipe: Any, family: Family) -> list[tuple[Any, int, int]]:
    """(tokenizer, max_length, offset in the text sequence) of each encoder whose tokens the denoiser attends to,
    with the lengths families.py encodes with."""
    if family.key in ("sd", "sdxl"):
        return [(pipe.tokenizer, pipe.tokenizer.model_max_length, 0)]  # SDXL's two encoders share the positions
    if family.key == "pixart_sigma":
        return [(pipe.tokenizer, 300, 0)]
    if family.key == "sd3":
        clip = pipe.tokenizer_max_length  # CLIP positions (both CLIPs, channel-concatenated), then T5's
        t5 = [(pipe.tokenizer_3, 256, clip)] if getattr(pipe, "text_encoder_3", None) is not None else []
        return [(pipe.tokenizer, clip, 0)] + t5  # without T5 its part is zeros: no word's
    raise not_for_family(family.key)


def not_for_family(key: str) -> ValueError:
    return ValueError(f"per-word attention maps are not for the {key!r} family; they are for "
                      f"{', '.join(FAMILIES)}")


def _text_words(pipe: Any, family: Family, text: str) -> tuple[Word, ...]:
    """The words of a text the encoder reads, with their token positions (none: no words)."""
    spans = [(m.start(), m.end()) for m in WORD.finditer(text)]
    tokens: list[list[int]] = [[] for _ in spans]
    for tokenizer, max_length, offset in _tokenizers(pipe, family):
        if not getattr(tokenizer, "is_fast", False):
            raise ValueError(f"per-word maps need a fast tokenizer (character offsets); {type(tokenizer).__name__} "
                             "is not one")
        enc = tokenizer(text, padding="max_length", max_length=max_length, truncation=True,
                        return_offsets_mapping=True)
        for position, (a, b) in enumerate(enc["offset_mapping"]):
            if b <= a:
                continue  # start, end and padding tokens
            word = next((i for i, (s, e) in enumerate(spans) if s < b and a < e), None)
            if word is not None:
                tokens[word].append(offset + position)
    words = [(text[s:e], positions) for (s, e), positions in zip(spans, tokens) if positions]
    return tuple(Word(w, k, tuple(positions)) for k, (w, positions) in enumerate(words))


NO_WORDS = "the prompt has no words to map (attention maps are per word of the prompt)"


def prompt_words(pipe: Any, family: Family, prompt: str) -> tuple[str, tuple[Word, ...]]:
    """(the text the encoder read, its words with their token positions). Tokens are placed by their character
    offsets, so BPE pieces (CLIP's, ending in </w>) and sentencepiece pieces (T5's, starting with ▁) join their word;
    special tokens (no characters) and punctuation join none. Words cut off by the encoder's length are left out."""
    if family.key not in FAMILIES:
        raise not_for_family(family.key)
    text = encoded_text(pipe, family, prompt)
    words = _text_words(pipe, family, text)
    if not words:
        raise ValueError(NO_WORDS)
    return text, words


@dataclass(frozen=True)
class PromptWords:
    """The words of a run's prompt: those of its one text, or, for a prompt schedule ([from:to:when]), those of its
    texts merged in prompt order (a word read in several texts is one word), with each text's token positions."""

    texts: tuple[str, ...]  # the texts the encoder reads, one per segment of the schedule, in order
    firsts: tuple[int, ...]  # the first loop iteration that reads each text
    words: tuple[Word, ...]  # merged; a Word's tokens are its positions in the first text that has it
    positions: tuple[tuple[tuple[int, ...], ...], ...]  # positions[t][w]: word w's positions in text t; () if absent

    def text_at(self, i: int) -> int:
        """The index of the text read at loop iteration i (0-based)."""
        return max(k for k, first in enumerate(self.firsts) if first <= i or k == 0)

    def reads(self, word: int, i: int) -> bool:
        """Whether the text read at loop iteration i has word `word`."""
        return bool(self.positions[self.text_at(i)][word])


def run_words(pipe: Any, family: Family, segments: Sequence[tuple[int, str]]) -> PromptWords:
    """The words of a run whose prompt reads text segments[k][1] from loop iteration segments[k][0] on (one segment
    without a schedule). A word is matched across texts by its spelling and which occurrence of it it is ("a" twice
    is two words); a word new in a later text goes after the word it follows there."""
    if family.key not in FAMILIES:
        raise not_for_family(family.key)
    texts = tuple(encoded_text(pipe, family, text) for _, text in segments)
    per_text = [_text_words(pipe, family, text) for text in texts]
    order: list[tuple[str, int]] = []  # (spelling, occurrence): the merged words, in order
    spelled: dict[tuple[str, int], str] = {}
    keyed: list[list[tuple[str, int]]] = []
    for words in per_text:
        seen: dict[str, int] = {}
        keys = []
        for w in words:
            keys.append((w.text.lower(), seen.get(w.text.lower(), 0)))
            seen[w.text.lower()] = keys[-1][1] + 1
        at = 0
        for w, key in zip(words, keys):
            if key in spelled:
                at = order.index(key) + 1
                continue
            while at < len(order) and order[at] not in keys:  # past the words this text replaced ("circle"
                at += 1  # before "triangle" in "a [circle:triangle:0.5]")
            order.insert(at, key)
            spelled[key] = w.text
            at += 1
        keyed.append(keys)
    if not order:
        raise ValueError(NO_WORDS)
    index = {key: k for k, key in enumerate(order)}
    positions = []
    for words, keys in zip(per_text, keyed):
        row: list[tuple[int, ...]] = [()] * len(order)
        for w, key in zip(words, keys):
            row[index[key]] = w.tokens
        positions.append(tuple(row))
    merged = tuple(Word(spelled[key], k, next(p[k] for p in positions if p[k])) for k, key in enumerate(order))
    return PromptWords(texts, tuple(first for first, _ in segments), merged, tuple(positions))


def _grid(queries: int, latent_hw: tuple[int, int]) -> tuple[int, int]:
    """The (h, w) of a layer's `queries` image positions: the latent grid downsampled by a power of two (UNet levels
    round up; a DiT's patches divide it)."""
    h, w = latent_hw
    for level in range(8):
        f = 2 ** level
        gh, gw = -(-h // f), -(-w // f)
        if gh * gw == queries:
            return gh, gw
    raise ValueError(f"an attention layer has {queries} image positions, which matches no downsampling of the "
                     f"{h}x{w} latent grid")


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(1, N, heads·d) -> (1, heads, N, d)."""
    return x.view(1, x.shape[1], heads, -1).transpose(1, 2)


def cross_probs(attn: Attention, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor,
                attention_mask: torch.Tensor | None, temb: torch.Tensor | None, row: int) -> torch.Tensor:
    """(queries, text tokens) attention probabilities of batch row `row`, averaged over the heads.

    Adapted from diffusers 0.42.1, AttnProcessor2_0.__call__ (the same projections, norms and mask, the scale
    scaled_dot_product_attention uses), with the probabilities made explicit."""
    x = hidden_states[row:row + 1]
    if attn.spatial_norm is not None:
        x = attn.spatial_norm(x, temb[row:row + 1])
    if x.ndim == 4:
        x = x.flatten(2).transpose(1, 2)
    if attn.group_norm is not None:
        x = attn.group_norm(x.transpose(1, 2)).transpose(1, 2)
    context = encoder_hidden_states[row:row + 1]
    if attn.norm_cross:
        context = attn.norm_encoder_hidden_states(context)
    query, key = _heads(attn.to_q(x), attn.heads), _heads(attn.to_k(context), attn.heads)
    if attn.norm_q is not None:
        query = attn.norm_q(query)
    if attn.norm_k is not None:
        key = attn.norm_k(key)
    scores = query.float() @ key.float().transpose(-1, -2) * query.shape[-1] ** -0.5
    if attention_mask is not None:  # PixArt's T5 padding: a (B, 1, tokens) additive bias
        mask = attention_mask[row:row + 1].float()
        scores = scores + mask.reshape(1, 1, -1, mask.shape[-1])
    return scores.softmax(-1).mean(1)[0]


def joint_text_probs(attn: Attention, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor,
                     row: int) -> torch.Tensor:
    """(image queries, text tokens) of an SD3 joint attention, batch row `row`, averaged over the heads: the share
    of each image query's attention, under the softmax over image and text keys together, that goes to each text key.

    Adapted from diffusers 0.42.1, JointAttnProcessor2_0.__call__ (projections and norms), with the probabilities
    made explicit; computed over query chunks, so an SD3 layer at 1024² never holds its whole score matrix."""
    x, context = hidden_states[row:row + 1], encoder_hidden_states[row:row + 1]
    query, key = _heads(attn.to_q(x), attn.heads), _heads(attn.to_k(x), attn.heads)
    text_key = _heads(attn.add_k_proj(context), attn.heads)
    if attn.norm_q is not None:
        query = attn.norm_q(query)
    if attn.norm_k is not None:
        key = attn.norm_k(key)
    if attn.norm_added_k is not None:
        text_key = attn.norm_added_k(text_key)
    scale = query.shape[-1] ** -0.5
    query, key, text_key = query.float(), key.float(), text_key.float()
    keys = key.shape[2] + text_key.shape[2]
    chunk = max(1, JOINT_CHUNK // (keys * attn.heads))
    parts = []
    for q in query.split(chunk, dim=2):
        image_scores, text_scores = q @ key.transpose(-1, -2) * scale, q @ text_key.transpose(-1, -2) * scale
        total = torch.logsumexp(torch.cat([image_scores, text_scores], -1), -1, keepdim=True)
        parts.append((text_scores - total).exp().mean(1)[0])
    return torch.cat(parts)


class AttentionProbe:
    """An attention processor that hands the layer to its original processor (which computes the output, unchanged)
    and gives the collector the layer's text-token probabilities for the conditional first image."""

    def __init__(self, original: Any, collector: "AttentionCollector", joint: bool) -> None:
        self.original = original
        self.collector = collector
        self.joint = joint

    def __call__(self, attn: Attention, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None,
                 **kwargs: Any) -> Any:
        extra = kwargs | ({} if temb is None else {"temb": temb})
        out = self.original(attn, hidden_states, encoder_hidden_states=encoder_hidden_states,
                            attention_mask=attention_mask, **extra)
        if encoder_hidden_states is not None:
            row = self.collector.cond_row(hidden_states.shape[0])
            with torch.no_grad():
                probs = (joint_text_probs(attn, hidden_states, encoder_hidden_states, row) if self.joint else
                         cross_probs(attn, hidden_states, encoder_hidden_states, attention_mask, temb, row))
            self.collector.add(probs)
        return out


def cond_row(batch: int, num_images: int, perturbed: bool) -> int:
    """The batch row of the first image's conditional prediction: the model call batches [uncond, cond, perturbed]
    parts of num_images rows each, the step's parts as the guidance method asks for them (perturbed: the method
    adds PAG's part after the conditional one)."""
    parts = batch // num_images
    return (parts - 1 - (1 if perturbed and parts > 1 else 0)) * num_images


class AttentionCollector(Observer):
    """Per-word maps of one run: the probes add each layer's probabilities to the step being computed, and on_step
    (the loop's StepEvent after every step) closes that step. Hand it to generate() (with any other observer through
    TeeObserver) while `probing` has its probes installed.

    Keeps the maps of every step, or of the steps `keep(num_steps, step_bytes)` names (an experiment's memory
    budget); the whole run's sum always.
    A step whose model call reached no probe raises: the run did not go through the installed processors (a traced
    UNet would skip them), and its maps would be silently empty.
    """

    def __init__(self, words: PromptWords, latent_hw: tuple[int, int], num_images: int = 1,
                 perturbed: bool = False, keep: Callable[[int, int], Collection[int]] | None = None) -> None:
        self.words = words  # the run's words, and which text (of a prompt schedule) each step reads
        self.latent_hw = latent_hw  # (h, w) of the latents: every layer's map is upsampled to it
        self.num_images = num_images  # the batch's images: rows [uncond × n?, cond × n, perturbed × n?]
        self.perturbed = perturbed  # the method adds a perturbed (PAG) part after the conditional one
        self.keep = keep
        self.steps: dict[int, np.ndarray] = {}  # loop index -> (words, h, w) float32, for the kept steps
        self.sigmas: dict[int, float | None] = {}  # loop index -> σ, for every step
        self.total = np.zeros((len(words.words), *latent_hw), np.float32)  # the whole run: the sum over the steps
        self.layers = 0  # layers that reached a probe in the last step
        self._kept: Collection[int] | None = None
        self._current: torch.Tensor | None = None
        self._calls = 0
        self._step = 0  # the loop iteration whose model call the probes are in
        self._select: dict[tuple[int, int], torch.Tensor] = {}  # (text, tokens) -> its word selection

    def cond_row(self, batch: int) -> int:
        return cond_row(batch, self.num_images, self.perturbed)

    def _words_of(self, tokens: int, device: torch.device) -> torch.Tensor:
        """(tokens, words) 0/1: which word each text position of this step's text belongs to."""
        text = self.words.text_at(self._step)
        select = self._select.get((text, tokens))
        if select is None:
            select = self._select[text, tokens] = torch.zeros(tokens, len(self.words.words))
            for w, positions in enumerate(self.words.positions[text]):
                select[[p for p in positions if p < tokens], w] = 1.0
        return select.to(device)

    def add(self, probs: torch.Tensor) -> None:
        """One layer's (queries, tokens) probabilities: summed per word, on the latent grid."""
        per_word = probs @ self._words_of(probs.shape[1], probs.device)  # (queries, words)
        gh, gw = _grid(per_word.shape[0], self.latent_hw)
        grid = per_word.T.reshape(1, per_word.shape[1], gh, gw)
        if (gh, gw) != self.latent_hw:
            grid = F.interpolate(grid, size=self.latent_hw, mode="bilinear", align_corners=False)
        self._current = grid[0] if self._current is None else self._current + grid[0]
        self._calls += 1

    def on_step(self, event: StepEvent) -> None:
        if self._current is None:
            raise RuntimeError(f"no cross-attention probe ran at step {event.step + 1}: the model ran without the "
                               "installed attention processors (a traced UNet?), so there are no maps")
        maps = self._current.float().cpu().numpy()
        self._current, self.layers, self._calls, self._step = None, self._calls, 0, event.step + 1
        self.total += maps
        self.sigmas[event.step] = event.sigma
        if self._kept is None:
            self._kept = range(event.num_steps) if self.keep is None else self.keep(event.num_steps, maps.nbytes)
        if event.step in self._kept:
            self.steps[event.step] = maps


def probed_modules(pipe: Any, family: Family) -> list[tuple[Attention, bool]]:
    """(layer, joint) for every layer whose text attention is mapped: cross-attention (UNet, PixArt), or joint
    attention with a text stream (SD3)."""
    if family.key not in FAMILIES:
        raise not_for_family(family.key)
    joint = family.key == "sd3"
    found = [(m, joint) for m in family.denoiser(pipe).modules() if isinstance(m, Attention)
             and (getattr(m, "add_k_proj", None) is not None if joint else m.is_cross_attention)]
    if not found:
        raise ValueError("this model has no cross-attention layers, so no word draws anywhere in particular")
    return found


@contextmanager
def probing(pipe: Any, family: Family, collector: AttentionCollector, loader: Any = None) -> Iterator[None]:
    """Install an AttentionProbe on every mapped layer of `pipe` for one run, then restore the original processors.

    Install and run from the thread that runs the process's generate() calls (the app's one generation worker): the
    probes sit on the shared model while installed. `loader`: the ModelLoader of the run, whose UNet traces
    (pipelines/traced.py) record the processors installed when they are made and bypass any installed later; it is
    asked for them before the probes go in and after they come out, so its traces are armed for the model's own
    processors: generate() then finds the probes installed, drops the traces and runs the UNet eagerly.
    """
    modules = probed_modules(pipe, family)
    if loader is not None:
        loader.traced_unet(pipe)
    originals = [(m, m.processor) for m, _ in modules]
    try:
        for module, joint in modules:
            module.set_processor(AttentionProbe(module.processor, collector, joint))
        yield
    finally:
        for module, original in originals:
            module.set_processor(original)
        if loader is not None:
            loader.traced_unet(pipe)


def upsample(maps: np.ndarray, height: int, width: int) -> np.ndarray:
    """(..., h, w) latent-grid maps -> (..., height, width), bilinear, as DAAM upsamples its heat maps."""
    x = torch.from_numpy(np.ascontiguousarray(maps, np.float32))
    shape = x.shape
    x = F.interpolate(x.reshape(1, -1, *shape[-2:]), size=(height, width), mode="bilinear", align_corners=False)
    return x.reshape(*shape[:-2], height, width).clamp_min(0).numpy()


def share_on(maps: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Per word, the fraction of its map's mass that lies where `mask` (H, W, in [0, 1]) is: maps (words, H, W)."""
    mass = maps.reshape(len(maps), -1).sum(1)
    on = (maps * mask[None]).reshape(len(maps), -1).sum(1)
    return np.where(mass > 0, on / np.maximum(mass, 1e-30), 0.0)


def normalized(image_map: np.ndarray) -> np.ndarray:
    """A map scaled to [0, 1] by its minimum and maximum, as DAAM shows its heat maps (a flat map is all 0)."""
    low, high = (float(image_map.min()), float(image_map.max())) if image_map.size else (0.0, 0.0)
    if not (high > low and math.isfinite(high) and math.isfinite(low)):
        return np.zeros_like(image_map)
    return (image_map - low) / (high - low)
