"""Build the real CLIP BPE tokenizer (49,408 tokens) from OpenAI's vocab file, as HF vocab.json + merges.txt.

Source: clip/bpe_simple_vocab_16e6.txt.gz in the PyPI wheel clip-anytorch==2.6.0 (MIT, Copyright (c) 2021 OpenAI):
    pip download --no-deps clip-anytorch==2.6.0 -d /tmp/clipw
The conversion follows clip/simple_tokenizer.py: byte symbols, their '</w>' forms, the first 48,894 merges, then
<|startoftext|> (49406) and <|endoftext|> (49407).
"""

from __future__ import annotations

import argparse
import gzip
import json
import zipfile
from pathlib import Path

from transformers import CLIPTokenizer

from training.common import CACHE

WHEEL_MEMBER = "clip/bpe_simple_vocab_16e6.txt.gz"
MAX_LENGTH = 77


def bytes_to_unicode() -> dict[int, str]:
    """Byte -> printable unicode char table. Copied from OpenAI CLIP, clip/simple_tokenizer.py (MIT)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(2**8):
        if b not in bs:
            bs.append(b)
            cs.append(2**8 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def read_bpe(source: Path) -> str:
    """The BPE merges text from the .txt.gz or from the wheel that holds it."""
    if source.suffix == ".whl":
        with zipfile.ZipFile(source) as z:
            return gzip.decompress(z.read(WHEEL_MEMBER)).decode("utf-8")
    return gzip.open(source, "rt", encoding="utf-8").read()


def build(source: Path, out: Path) -> CLIPTokenizer:
    """Write vocab.json/merges.txt to out and return a CLIPTokenizer saved there (save_pretrained layout)."""
    lines = read_bpe(source).split("\n")
    merges = [tuple(m.split()) for m in lines[1 : 49152 - 256 - 2 + 1]]
    vocab = list(bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab] + ["".join(m) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    assert len(vocab) == 49408, len(vocab)
    tok = CLIPTokenizer(
        vocab={t: i for i, t in enumerate(vocab)},
        merges=merges,
        bos_token="<|startoftext|>",
        eos_token="<|endoftext|>",
        unk_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        model_max_length=MAX_LENGTH,
    )
    tok.save_pretrained(out)  # tokenizer.json + tokenizer_config.json
    # The classic files too, so slow tokenizers and older transformers read the same vocabulary.
    (out / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}, ensure_ascii=False), encoding="utf-8")
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n", encoding="utf-8")
    return CLIPTokenizer.from_pretrained(out)


def load(path: Path = CACHE / "tokenizer") -> CLIPTokenizer:
    return CLIPTokenizer.from_pretrained(path)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--source", type=Path, default=Path("/tmp/clipw/clip_anytorch-2.6.0-py3-none-any.whl"))
    p.add_argument("--out", type=Path, default=CACHE / "tokenizer")
    a = p.parse_args()
    tok = build(a.source, a.out)
    print(tok("a photo of a cat").input_ids, len(tok))


if __name__ == "__main__":
    main()
