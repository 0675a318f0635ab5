"""The incremental detokenizer against full decodes: random token streams, split multi-byte characters, stops."""

from __future__ import annotations

import random

import pytest
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from moeserve.builtin.locate import builtin_model_dir
from moeserve.engine.detokenizer import REPLACEMENT, IncrementalDetokenizer

WORDS = ["the", "cat", "sat", " on", "mat", "Привет", "мир", "你好", "世界", "😀", "🎉", "naïve", "café", "\n", "  "]


@pytest.fixture(scope="module")
def builtin():
    return AutoTokenizer.from_pretrained(builtin_model_dir())


def sentencepiece_like() -> PreTrainedTokenizerFast:
    """Llama-style: Metaspace words, characters outside the vocabulary as <0xXX> byte tokens."""
    chars = sorted(set("abcdefghijklmnopqrstuvwxyz▁.,!"))
    vocab = {"<unk>": 0, "</s>": 1, **{f"<0x{b:02X}>": 2 + b for b in range(256)}}
    for piece in chars + ["▁t", "▁th", "▁the", "▁c", "at", "▁cat", "▁s", "he"]:
        vocab.setdefault(piece, len(vocab))
    merges = [("▁", "t"), ("▁t", "h"), ("▁th", "e"), ("▁", "c"), ("a", "t"), ("▁c", "at"), ("▁", "s"), ("h", "e")]
    tok = Tokenizer(models.BPE(vocab, merges, unk_token="<unk>", byte_fallback=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.pre_tokenizer = pre_tokenizers.Split("▁", behavior="merged_with_next")
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="</s>")


class DecodeOnly:
    """A tokenizer with only `decode`: the detokenizer's fallback for tokenizers without a Rust backend."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer

    def decode(self, ids, **kwargs) -> str:
        return self.tokenizer.decode(ids, **kwargs)


@pytest.fixture(scope="module", params=["builtin", "builtin-fallback", "sentencepiece", "sentencepiece-fallback"])
def tok(request, builtin):
    base = builtin if request.param.startswith("builtin") else sentencepiece_like()
    return DecodeOnly(base) if request.param.endswith("fallback") else base


def base_of(tok):
    return tok.tokenizer if isinstance(tok, DecodeOnly) else tok


def full_decode(tok, ids, skip=True) -> str:
    return tok.decode(ids, skip_special_tokens=skip, clean_up_tokenization_spaces=False)


def random_text(rng: random.Random) -> str:
    return "".join(rng.choice(WORDS) + rng.choice(["", " ", ", "]) for _ in range(rng.randrange(1, 25)))


def feed(detok: IncrementalDetokenizer, ids: list[int], rng: random.Random) -> list[str]:
    """Feeds ids in random chunks of 1 to 3; returns the released pieces."""
    pieces, fed = [], 0
    while fed < len(ids):
        chunk = ids[fed : fed + rng.randrange(1, 4)]
        fed += len(chunk)
        new, hit = detok.add_tokens(chunk, finished=fed == len(ids))
        assert hit is None
        pieces.append(new)
    return pieces


@pytest.mark.parametrize("fallback", [False, True])
@pytest.mark.parametrize("skip", [True, False])
def test_random_token_streams_rebuild_the_full_decode(builtin, fallback, skip):
    """Any ids, special and invalid UTF-8 included: the released pieces join to the full decode."""
    tok = DecodeOnly(builtin) if fallback else builtin
    rng = random.Random(0)
    vocab = len(builtin)
    for _ in range(150):
        ids = [rng.randrange(vocab) for _ in range(rng.randrange(1, 40))]
        detok = IncrementalDetokenizer(tok, stop=[], skip_special_tokens=skip)
        assert "".join(feed(detok, ids, rng)) == detok.text == full_decode(tok, ids, skip)


def test_split_multibyte_characters_are_never_released_half_done(tok):
    rng = random.Random(1)
    some_split = False
    for _ in range(40):
        text = random_text(rng)
        ids = base_of(tok).encode(text, add_special_tokens=False)
        some_split |= any(REPLACEMENT in full_decode(tok, [i]) for i in ids)
        detok = IncrementalDetokenizer(tok, stop=[])
        pieces = [detok.add_tokens([t], finished=i == len(ids) - 1)[0] for i, t in enumerate(ids)]
        assert all(REPLACEMENT not in p for p in pieces)
        assert "".join(pieces) == full_decode(tok, ids)
    assert some_split  # the tokenizer really cuts characters into bytes


def test_byte_tokens_that_rewrite_earlier_text_do_not_break_decoding(caplog):
    """With ByteFallback, invalid bytes turn the valid ones before them into U+FFFD as well: the whole-text decode
    changes behind the stream, DecodeStream refuses, and the detokenizer goes on in Python instead of failing."""
    tok = sentencepiece_like()
    ids = [2 + 0x45, 2 + 0xC3, 2 + 0xC3, *tok.encode("ok", add_special_tokens=False)]  # 'E', two bad bytes, ok
    detok = IncrementalDetokenizer(tok, stop=[])
    text = "".join(detok.add_tokens([t], finished=i == len(ids) - 1)[0] for i, t in enumerate(ids))
    assert text.startswith("E") and text.endswith("ok")
    assert "DecodeStream failed" in caplog.text  # the path this test is about was taken


def test_special_tokens_are_skipped_or_kept(builtin):
    ids = builtin.encode("<|im_start|>assistant\nДа 😀<|im_end|>", add_special_tokens=False)
    for skip in (True, False):
        detok = IncrementalDetokenizer(builtin, stop=[], skip_special_tokens=skip)
        text = "".join(detok.add_tokens([t], finished=False)[0] for t in ids) + detok.add_tokens([], True)[0]
        assert text == full_decode(builtin, ids, skip)
        assert ("<|im_end|>" in text) is not skip


def reference(tok, ids: list[int], bounds: list[int], stops: list[str], include: bool):
    """What each call should return, from whole-text decodes: after k tokens the text is decode(ids[:k]), except
    that while it ends in U+FFFD (a character not complete yet) it stays what it last was; a stop is searched in
    all of it (the first occurrence; the earlier-listed stop on a tie) and the last len(stop) - 1 characters are
    held back."""
    hold = max((len(s) for s in stops), default=1) - 1
    text, released, searched, out, done = "", "", 0, [], 0
    for k in bounds:
        for j in range(done + 1, k + 1):
            decoded = full_decode(tok, ids[:j])
            text = decoded if not decoded.endswith(REPLACEMENT) else text
        done = k
        finished = k == len(ids)
        text = full_decode(tok, ids) if finished else text
        hits = [(text.find(s, max(0, searched - len(s) + 1)), i, s) for i, s in enumerate(stops)]
        hits = sorted((at, i, s) for at, i, s in hits if at != -1)
        searched = len(text)
        if hits:
            at, _, stop = hits[0]
            release = text[: at + len(stop) if include else at]
        else:
            release = text if finished else text[: max(len(released), len(text) - hold)]
        out.append((release[len(released) :], stop if hits else None))
        released = release
        if hits:
            break
    return out


@pytest.mark.parametrize("include", [False, True])
def test_stop_strings_are_found_as_in_the_full_text(tok, include):
    rng = random.Random(2 + include)
    hits = 0
    for _ in range(120):
        ids = base_of(tok).encode(random_text(rng), add_special_tokens=False)
        full = full_decode(tok, ids)
        stops = ["zzz"]  # never there
        for _ in range(rng.randrange(1, 4)):
            start = rng.randrange(len(full))
            stops.append(full[start : start + rng.randrange(1, 7)])
        stops = [s for s in stops if s]
        bounds = sorted(set(rng.sample(range(1, len(ids) + 1), k=max(1, len(ids) // 2))) | {len(ids)})
        detok = IncrementalDetokenizer(tok, stops, include_stop_str_in_output=include)
        got = []
        for a, b in zip([0, *bounds], bounds):
            got.append(detok.add_tokens(ids[a:b], finished=b == len(ids)))
            if got[-1][1] is not None:
                break
        assert got == reference(tok, ids, bounds, stops, include)
        released, hit = "".join(new for new, _ in got), got[-1][1]
        assert released == detok.text
        if hit is None:
            assert released == full
            continue
        hits += 1
        at = full.find(hit)  # the first occurrence in the whole text, nothing past it released
        assert released == full[: at + len(hit) if include else at]
    assert hits > 50


def test_nothing_past_a_stop_prefix_is_streamed(builtin):
    ids = builtin.encode("alpha beta STOP gamma", add_special_tokens=False)
    detok = IncrementalDetokenizer(builtin, stop=["STOP", "beta S!"])
    streamed = ""
    for t in ids:
        new, hit = detok.add_tokens([t], finished=False)
        streamed += new
        assert "alpha beta ".startswith(streamed)  # " S", "ST", "STO" might still be a stop: held back
        if hit:
            break
    assert hit == "STOP" and streamed == "alpha beta "
    assert detok.add_tokens(builtin.encode(" more"), finished=True) == ("", None)  # done after a stop
