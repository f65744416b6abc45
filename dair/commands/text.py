"""Text from the command line and standard input must be UTF-8: the tokenizer works on text.

Python hands undecodable argv bytes over as lone surrogates (surrogateescape). Replacing them
would send the model a prompt the user never wrote, so they are an error naming the bytes.
"""
from __future__ import annotations

from dair.errors import DairError

SHOWN = 4  # bad bytes named in the message; the rest are counted


def bad_bytes(text: str) -> list[tuple[int, int]]:
    """(byte offset, byte value) of each byte that was not valid UTF-8 in the original."""
    out, off = [], 0
    for ch in text:
        code = ord(ch)
        if 0xDC80 <= code <= 0xDCFF:  # surrogateescape's stand-in for the byte code - 0xDC00
            out.append((off, code - 0xDC00))
            off += 1
        else:
            off += len(ch.encode("utf-8", "surrogatepass"))
    return out


def check_utf8(text: str | None, what: str) -> None:
    """DairError naming the undecodable bytes of `text` (the prompt, --system, ...), if any."""
    if not text:
        return
    bad = bad_bytes(text)
    if not bad:
        return
    shown = ", ".join(f"0x{b:02x} at byte {o}" for o, b in bad[:SHOWN])
    more = f" and {len(bad) - SHOWN} more" if len(bad) > SHOWN else ""
    raise DairError(f"{what} is not valid UTF-8 ({shown}{more}); pass the text in UTF-8")


def stdin_error(e: UnicodeDecodeError) -> DairError:
    return DairError(f"standard input is not valid UTF-8 (0x{e.object[e.start]:02x} at byte {e.start} of the "
                     "chunk read); pass the text in UTF-8")
