"""IncrementalDetokenizer: UTF-8 safety, leading spaces, bounded decode windows, stop strings."""

from __future__ import annotations

import random

import pytest
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from pymllm.orchestrator.incremental_detokenizer import IncrementalDetokenizer
from pymllm.server.testing import ByteTokenizer

TEXTS = [
    "hello world",
    "café é naïve",
    "你好，世界 hello",
    "emoji 😀 and 👍🏽 and 👨‍👩‍👧",
    "the quick brown fox jumps over the lazy dog é 你好 😀",
]


def _byte_level_bpe() -> PreTrainedTokenizerFast:
    """GPT-2/Qwen style: byte-level BPE trained on ASCII, so non-ASCII characters are split
    into single-byte tokens."""
    corpus = ["hello world this is a test of the tokenizer", "the quick brown fox jumps over the lazy dog"] * 20
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=["<|endoftext|>"]
    )
    tok.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")


def _sentencepiece_like() -> PreTrainedTokenizerFast:
    """Llama style: "▁" word marks, byte fallback for unknown characters, and a decoder that
    strips the first space (so a word decoded alone loses its leading space)."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    for ch in "▁abcdefghijklmnopqrstuvwxyz":
        vocab.setdefault(ch, len(vocab))
    merges = []
    for a, b in [("▁", "h"), ("▁h", "e"), ("l", "l"), ("▁he", "ll"), ("▁hell", "o"), ("▁", "w"), ("o", "r"),
                 ("▁w", "or"), ("l", "d"), ("▁wor", "ld"), ("▁", "t"), ("h", "e"), ("▁t", "he")]:
        merges.append((a, b))
        vocab.setdefault(a + b, len(vocab))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, byte_fallback=True, unk_token="<unk>", fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def _tiny_tokenizer(tmp_path_factory):
    tiny_models = pytest.importorskip("pymllm.testing.tiny_models")
    path = tiny_models.build_tiny_tokenizer(tmp_path_factory.mktemp("tiny_tok"))
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


@pytest.fixture(params=["byte_level_bpe", "sentencepiece_like", "byte_tokenizer", "tiny"], scope="module")
def tokenizer(request, tmp_path_factory):
    if request.param == "byte_level_bpe":
        return _byte_level_bpe()
    if request.param == "sentencepiece_like":
        return _sentencepiece_like()
    if request.param == "byte_tokenizer":
        return ByteTokenizer()
    return _tiny_tokenizer(tmp_path_factory)


def _encode(tokenizer, text):
    if isinstance(tokenizer, ByteTokenizer):
        return tokenizer.encode(text)
    return tokenizer.encode(text, add_special_tokens=False)


def _stream(detok, ids, chunk_sizes):
    pieces, i = [], 0
    for size in chunk_sizes:
        if i >= len(ids):
            break
        text, stopped, _ = detok.add_tokens(ids[i:i + size])
        pieces.append(text)
        i += size
        if stopped:
            return pieces, True
    if i < len(ids):
        text, stopped, _ = detok.add_tokens(ids[i:])
        pieces.append(text)
        if stopped:
            return pieces, True
    pieces.append(detok.finish())
    return pieces, False


@pytest.mark.parametrize("text", TEXTS)
def test_token_by_token_equals_full_decode_and_never_emits_partial_chars(tokenizer, text):
    ids = _encode(tokenizer, text)
    detok = IncrementalDetokenizer(tokenizer, None, skip_special_tokens=True, stop=[])
    pieces, _ = _stream(detok, ids, [1] * len(ids))
    assert "".join(pieces) == tokenizer.decode(ids, skip_special_tokens=True)
    assert not any("\ufffd" in p for p in pieces)


def test_random_chunking_is_equivalent(tokenizer):
    rng = random.Random(0)
    for text in TEXTS:
        ids = _encode(tokenizer, text)
        for _ in range(5):
            sizes = [rng.randint(1, 4) for _ in range(len(ids))]
            detok = IncrementalDetokenizer(tokenizer, None, True, [])
            pieces, _ = _stream(detok, ids, sizes)
            assert "".join(pieces) == tokenizer.decode(ids, skip_special_tokens=True)


def test_multibyte_characters_are_held_until_complete():
    tok = ByteTokenizer()
    detok = IncrementalDetokenizer(tok, None, True, [])
    emoji = list("😀".encode())
    outputs = [detok.add_tokens([b])[0] for b in emoji]
    assert outputs == ["", "", "", "😀"]
    nihao = list("你好".encode())
    outputs = [detok.add_tokens([b])[0] for b in nihao]
    assert outputs == ["", "", "你", "", "", "好"]


def test_prompt_tail_keeps_leading_space():
    tok = _sentencepiece_like()
    prompt = _encode(tok, "the")
    word = _encode(tok, "the hello")[len(prompt):]
    assert tok.decode(word) == "hello"  # decoded alone the space is lost
    detok = IncrementalDetokenizer(tok, prompt_ids_tail=prompt, skip_special_tokens=True, stop=[])
    text = "".join(detok.add_tokens([t])[0] for t in word) + detok.finish()
    assert text == " hello"


class _CountingTokenizer:
    def __init__(self, inner):
        self.inner = inner
        self.longest = 0

    def decode(self, ids, skip_special_tokens=True):
        self.longest = max(self.longest, len(ids))
        return self.inner.decode(ids, skip_special_tokens=skip_special_tokens)


def test_decode_window_stays_small_for_long_outputs():
    counting = _CountingTokenizer(_byte_level_bpe())
    ids = _encode(counting.inner, "hello world é 你好 😀 " * 200)
    detok = IncrementalDetokenizer(counting, None, True, [])
    text = "".join(detok.add_tokens([t])[0] for t in ids) + detok.finish()
    assert text == counting.inner.decode(ids)
    assert counting.longest <= 8  # a window of a few tokens, never the whole output


def test_invalid_bytes_are_not_held_forever():
    tok = ByteTokenizer()
    detok = IncrementalDetokenizer(tok, None, True, [])
    out = "".join(detok.add_tokens([0xFF])[0] for _ in range(20))
    assert out.count("\ufffd") >= 10
    assert "\ufffd" in out + detok.finish()


def test_finish_flushes_an_incomplete_character():
    tok = ByteTokenizer()
    detok = IncrementalDetokenizer(tok, None, True, [])
    assert detok.add_tokens(list("a".encode()) + [0xE4, 0xBD])[0] == "a"
    assert detok.finish() == "\ufffd"


# ---------------------------------------------------------------- stop strings


def _run_bytes(text, stop, chunk=1):
    tok = ByteTokenizer()
    ids = tok.encode(text)
    detok = IncrementalDetokenizer(tok, None, True, stop)
    pieces, stopped = _stream(detok, ids, [chunk] * len(ids))
    return pieces, stopped, detok


@pytest.mark.parametrize("chunk", [1, 2, 3, 100])
def test_stop_string_is_trimmed_and_never_emitted_partially(chunk):
    pieces, stopped, detok = _run_bytes("Hello world<|end|>ignored", ["<|end|>"], chunk)
    assert stopped and detok.matched == "<|end|>"
    assert "".join(pieces) == "Hello world"
    assert all("<" not in p for p in pieces)


def test_partial_stop_prefix_is_released_when_it_does_not_complete():
    tok = ByteTokenizer()
    detok = IncrementalDetokenizer(tok, None, True, ["STOP"])
    assert detok.add_tokens(tok.encode("abc ST")) == ("abc ", False, None)
    assert detok.add_tokens(tok.encode("AR")) == ("STAR", False, None)
    assert detok.add_tokens(tok.encode(" ST")) == (" ", False, None)
    assert detok.finish() == "ST"


def test_stop_string_with_multibyte_characters():
    pieces, stopped, detok = _run_bytes("答案是42。结束了", ["结束"])
    assert stopped and detok.matched == "结束"
    assert "".join(pieces) == "答案是42。"


def test_earliest_ending_stop_wins_regardless_of_chunking():
    for chunk in (1, 100):
        pieces, stopped, detok = _run_bytes("xxabcdyy", ["bcd", "abcdz", "c"], chunk)
        assert stopped and detok.matched == "c"
        assert "".join(pieces) == "xxab"


def test_after_stop_nothing_more_is_emitted():
    tok = ByteTokenizer()
    detok = IncrementalDetokenizer(tok, None, True, ["."])
    assert detok.add_tokens(tok.encode("Hi. there")) == ("Hi", True, ".")
    assert detok.add_tokens(tok.encode("more")) == ("", True, ".")
    assert detok.finish() == ""



def test_text_before_an_incomplete_character_is_not_delayed():
    tok = ByteTokenizer()
    detok = IncrementalDetokenizer(tok, None, True, ["!"])
    assert detok.add_tokens(tok.encode("ok ") + [0xC3]) == ("ok ", False, None)
    assert detok.add_tokens([0xA9, ord("!")]) == ("é", True, "!")


class _FailsOnByte(ByteTokenizer):
    """Raises when asked to decode byte 0xFF: a stand-in for a bug in one request's decoding."""

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        if 0xFF in ids:
            raise RuntimeError("decoder bug")
        return super().decode(ids, skip_special_tokens)


def _report(rids, new_ids, finished):
    from pymllm.engine.io_struct import BatchTokenIDOut

    n = len(rids)
    return BatchTokenIDOut(rids=rids, new_token_ids=new_ids, finished_reasons=finished, prompt_tokens=[1] * n,
                           completion_tokens=[len(t) for t in new_ids], cached_tokens=[0] * n, logprobs=[None] * n,
                           skip_special_tokens=[True] * n, stop_strings=[[] for _ in rids])


def test_a_request_whose_decoding_raises_ends_with_a_500_and_its_batch_mates_go_on():
    from pymllm.engine.io_struct import FinishReason
    from pymllm.orchestrator.detokenizer_process import DetokenizerManager

    manager = DetokenizerManager(_FailsOnByte())
    outs = manager.process(_report(["bad", "good"], [[0xFF], list(b"hi")], [None, None])).outputs
    assert [o.rid for o in outs] == ["bad", "good"]
    assert outs[0].finished and outs[0].finish_reason.status_code == 500
    assert not outs[1].finished and outs[1].text == "hi"
    # The scheduler does not know: its later reports of "bad" are dropped until it ends the request.
    later = manager.process(_report(["bad", "good"], [list(b"x"), list(b"!")], [None, FinishReason("length")]))
    assert [(o.rid, o.text, o.finished) for o in later.outputs] == [("good", "!", True)]
    last = manager.process(_report(["bad"], [list(b"y")], [FinishReason("length")]))
    assert last.outputs == [] and not manager.stopped and not manager.states
