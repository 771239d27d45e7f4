"""The raw bytes a token id stands for, and how a logprob entry names a token that is not text.

A byte-level BPE token (Qwen, GPT-2, SmolLM) may hold part of a UTF-8 character: "世界" can be
the tokens "世" + the first byte of "界", then "界"'s other two bytes. Decoded alone such a token
is U+FFFD, which loses its bytes. OpenAI's logprobs name such a token ``bytes:\\xe7\\x95``
and give its real bytes in ``bytes``; the detokenizer names it the same way
(``logprob_token_text``), and the server turns the name back into bytes (``token_name_bytes``).
"""

from __future__ import annotations

import json
import re
from typing import Dict, Optional

_BYTES_NAME = re.compile(r"bytes:((?:\\x[0-9a-f]{2})+)")
_BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def byte_level_alphabet() -> Dict[str, int]:
    """Byte-level BPE's printable stand-in character for each byte value -> that byte: printable
    Latin-1 bytes stand for themselves, the other 68 are shifted past 255 in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    alphabet = {chr(b): b for b in printable}
    shifted = 0
    for b in range(256):
        if b not in printable:
            alphabet[chr(256 + shifted)] = b
            shifted += 1
    return alphabet


def _is_byte_level(tokenizer) -> bool:
    backend_decoder = getattr(getattr(tokenizer, "backend_tokenizer", None), "decoder", None)
    if backend_decoder is None:
        return False
    # The decoder's own JSON (its pickled state), not the whole tokenizer's: that one holds the
    # vocabulary and merges (1.5 MB and 11 ms for SmolLM2's, at every detokenizer start).
    decoder = json.loads(backend_decoder.__getstate__())
    parts = decoder.get("decoders", [decoder]) if decoder.get("type") == "Sequence" else [decoder]
    return any(part.get("type") == "ByteLevel" for part in parts)


class TokenBytes:
    """token id -> the bytes it decodes to, partial UTF-8 included (cached per id)."""

    def __init__(self, tokenizer) -> None:
        self._tokenizer = tokenizer
        self._alphabet: Optional[Dict[str, int]] = byte_level_alphabet() if _is_byte_level(tokenizer) else None
        self._cache: Dict[int, bytes] = {}

    def __call__(self, token_id: int) -> bytes:
        raw = self._cache.get(token_id)
        if raw is None:
            raw = self._cache[token_id] = self._bytes(token_id)
        return raw

    def _bytes(self, token_id: int) -> bytes:
        piece = self._tokenizer.convert_ids_to_tokens(token_id)
        if isinstance(piece, str):
            if self._alphabet is not None and piece and all(c in self._alphabet for c in piece):
                return bytes(self._alphabet[c] for c in piece)
            fallback = _BYTE_FALLBACK.fullmatch(piece)  # SentencePiece's byte-fallback tokens
            if fallback is not None:
                return bytes([int(fallback.group(1), 16)])
        return self._tokenizer.decode([token_id]).encode("utf-8")


def logprob_token_text(text: str, raw: bytes) -> str:
    """How a logprob entry names a token decoded alone as ``text`` with bytes ``raw``: its text, or
    ``bytes:\\x..`` where the bytes are not whole UTF-8 characters (and the text is U+FFFD)."""
    if "\ufffd" not in text:
        return text
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{b:02x}" for b in raw)


def token_name_bytes(name: str) -> bytes:
    """The bytes of a token as logprob entries name it (``logprob_token_text``)."""
    match = _BYTES_NAME.fullmatch(name)
    if match is not None:
        return bytes.fromhex(match.group(1).replace("\\x", ""))
    return name.encode("utf-8")
