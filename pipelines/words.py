"""Counted nouns for text a person reads: "1 step", "20 steps", never "1 steps"."""

from __future__ import annotations


def counted(n: int, noun: str, plural: str | None = None) -> str:
    """`n` and the noun in the number it takes: counted(1, "step") -> "1 step"; plural defaults to noun + "s"."""
    return f"{n} {noun if n == 1 else plural or noun + 's'}"
