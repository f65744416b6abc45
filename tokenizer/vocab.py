"""A tokenizer's vocabulary as the model file states it, whatever the file format."""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache

# GGUF token types (llama.cpp's llama_token_type).
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

# Tokens that end a turn in the chat formats we know; generation stops on any of them.
END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<|endoftext|>", "</s>", "<end_of_turn>", "<|eom_id|>",
               "<|end|>")


@lru_cache(maxsize=1)
def byte_to_unicode() -> dict[int, str]:
    """GPT-2's printable stand-in for each byte, as byte-level BPE vocabularies spell tokens."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs, strict=True)}


@lru_cache(maxsize=1)
def unicode_to_byte() -> dict[str, int]:
    return {c: b for b, c in byte_to_unicode().items()}


@dataclass
class Vocab:
    """`kind` is "gpt2" (byte-level BPE) or "llama" (SentencePiece-style BPE by scores).

    `tokens` are spelled as the GGUF spells them: GPT-2 byte stand-ins for "gpt2", "▁" for
    spaces and "<0xNN>" byte tokens for "llama".
    """

    kind: str
    tokens: list[str]
    token_types: list[int]
    scores: list[float] | None = None
    merges: list[tuple[str, str]] | None = None
    bos_id: int | None = None
    eos_id: int | None = None
    eot_ids: list[int] = field(default_factory=list)  # explicit end-of-turn ids from metadata
    add_bos: bool = False
    add_space_prefix: bool = True
    pre: str = "default"
    chat_template: str | None = None
    source: str = ""

    def __len__(self) -> int:
        return len(self.tokens)

    def is_special(self, i: int) -> bool:
        return self.token_types[i] in (CONTROL, USER_DEFINED, UNKNOWN)
