"""Tokens that hold part of a UTF-8 character: their bytes (TokenBytes, against the tokenizer's
own encoding of the text), their names in logprob entries (``bytes:\\x..``, as OpenAI names
them), and the chat ``bytes`` field and legacy ``text_offset`` computed from those names."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from pymllm.orchestrator.detokenizer_process import DetokenizerManager
from pymllm.orchestrator.token_bytes import TokenBytes, byte_level_alphabet, logprob_token_text, token_name_bytes
from pymllm.server.logprobs import TextOffsets, chat_logprobs, completion_logprobs
from pymllm.testing.tiny_models import tiny_model_dir

TEXT = "你好，世界 🎉 ĳ naïve"


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(tiny_model_dir("qwen3"))


def test_the_byte_level_alphabet_is_a_bijection():
    alphabet = byte_level_alphabet()
    assert sorted(alphabet.values()) == list(range(256)) and len(alphabet) == 256
    assert all(alphabet[chr(b)] == b for b in range(ord("!"), ord("~") + 1))
    assert alphabet["Ġ"] == ord(" ") and alphabet["Ċ"] == ord("\n")  # what byte-level vocabularies show


def test_token_bytes_rebuild_the_text(tokenizer):
    token_bytes = TokenBytes(tokenizer)
    ids = tokenizer(TEXT).input_ids
    assert b"".join(token_bytes(i) for i in ids) == TEXT.encode()
    # Some of those tokens are not whole characters: the case this is for.
    assert any("\ufffd" in tokenizer.decode([i]) for i in ids)
    # Every token that is whole characters has exactly the bytes of its text.
    for i in range(len(tokenizer)):
        text = tokenizer.decode([i])
        if "\ufffd" not in text:
            assert token_bytes(i) == text.encode(), i


def test_byte_fallback_pieces_of_sentencepiece_vocabularies():
    class Fallback:
        def convert_ids_to_tokens(self, token_id):
            return {0: "<0xE4>", 1: "▁hi"}[token_id]

        def decode(self, ids):
            return {0: "\ufffd", 1: " hi"}[ids[0]]

    token_bytes = TokenBytes(Fallback())
    assert token_bytes(0) == b"\xe4" and token_bytes(1) == b" hi"


def test_names_round_trip(tokenizer):
    token_bytes = TokenBytes(tokenizer)
    for i in tokenizer(TEXT).input_ids:
        name = logprob_token_text(tokenizer.decode([i]), token_bytes(i))
        assert token_name_bytes(name) == token_bytes(i)
        assert name.startswith("bytes:") == ("\ufffd" in tokenizer.decode([i]))
    assert logprob_token_text("\ufffd", "\ufffd".encode()) == "\ufffd"  # a real replacement character
    assert token_name_bytes("bytes: not an escape") == b"bytes: not an escape"


def test_the_detokenizer_names_partial_tokens_by_their_bytes(tokenizer):
    ids = tokenizer(TEXT).input_ids
    entries = DetokenizerManager(tokenizer)._logprobs([(i, -1.0, [(i, -1.0)]) for i in ids])
    names = [name for name, _, _ in entries]
    assert b"".join(token_name_bytes(n) for n in names) == TEXT.encode()
    assert [top[0][0] for _, _, top in entries] == names
    assert all("\ufffd" not in n for n in names)


def test_chat_bytes_and_completion_offsets_follow_the_characters(tokenizer):
    ids = tokenizer(TEXT).input_ids
    entries = DetokenizerManager(tokenizer)._logprobs([(i, -1.0, []) for i in ids])
    chat = chat_logprobs(entries, 0)
    assert b"".join(bytes(t.bytes) for t in chat.content) == TEXT.encode()
    legacy = completion_logprobs(entries, 0, TextOffsets(3))
    # Each token starts after the characters completed before it (after a 3-character echo): a
    # token ending inside a character moves the offset only once that character completes.
    token_bytes = TokenBytes(tokenizer)
    expected = [3 + len(b"".join(token_bytes(i) for i in ids[:k]).decode("utf-8", "ignore")) for k in range(len(ids))]
    assert legacy.text_offset == expected
    assert any(a == b for a, b in zip(expected, expected[1:]))  # some token completed nothing


def test_text_offsets_take_the_fast_path_only_between_whole_characters():
    # Against the incremental decoder run over every token (the offsets' definition): a dangling
    # partial character, then plain text; a character split over three tokens; a literal "bytes:" name.
    import codecs

    names = ["ab", "bytes:\\xe4", "cd", "bytes:\\xe4\\xb8", "bytes:\\xad", "é", "bytes: not an escape", "x"]
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    expected, at = [], 5
    for name in names:
        expected.append(at)
        at += len(decoder.decode(token_name_bytes(name)))
    offsets = TextOffsets(5)
    assert [offsets.place(name) for name in names] == expected
    assert offsets.offset == at
