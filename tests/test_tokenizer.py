"""Chapter 01: our BPE encoder against sentencepiece, tokenizer.bin byte for byte, bad input."""

from __future__ import annotations

import hashlib
import struct

import pytest
import sentencepiece as spm
from hypothesis import given, settings
from hypothesis import strategies as st

from babyllama.tokenizer import (
    Tokenizer,
    TokenizerError,
    export_tokenizer_bin,
    load_sentencepiece,
    read_tokenizer_bin,
    sentences,
    train_tokenizer,
)

LLAMA2_BIN_SHA256 = "50a52ef822ee9e83de5ce9d0be0a025a773d019437f58b5ff9dcafb063ece361"
EDGE_CASES = ["", " ", "Hello world", "  two leading", "trailing  ", "a\nb\n\n", "\t\r\n",
              "日本語のテキスト", "中文分词", "emoji 🦙🔥👍🏽 family 👨‍👩‍👧",
              "\x00\x01\x1f\x7f ctrl",
              "Ünïcödé façade naïve", "12345 3.14159", "<0x41> <s> </s> <unk>", "   \n   ",
              "\u200b\ufeff zero width", "𝔘𝔫𝔦𝔠𝔬𝔡𝔢", "Once upon a time, there was a little cat."]


def test_llama2_tokenizer_bin_is_llama2c_file(llama2_bin):
    assert hashlib.sha256(llama2_bin.read_bytes()).hexdigest() == LLAMA2_BIN_SHA256


@pytest.mark.parametrize("text", EDGE_CASES)
def test_llama2_edge_cases_match_sentencepiece(llama2_model, llama2_bin, text):
    sp = spm.SentencePieceProcessor(model_file=str(llama2_model))
    tok = Tokenizer.from_bin(llama2_bin)
    assert tok.encode(text, bos=False) == sp.encode(text)
    assert tok.encode(text, bos=True, eos=True) == [1, *sp.encode(text), 2]
    assert tok.decode(tok.encode(text)) == text


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.characters(blacklist_categories=["Cs"]), max_size=40))
def test_llama2_arbitrary_unicode(llama2_model, llama2_bin, text):
    sp = spm.SentencePieceProcessor(model_file=str(llama2_model))
    tok = _cached(llama2_bin)
    assert tok.encode(text, bos=False) == sp.encode(text)
    if "▁" not in text:   # sentencepiece spells spaces '▁': a literal one decodes as a space
        assert tok.decode(tok.encode(text)) == text


_CACHE: dict = {}


def _cached(path) -> Tokenizer:
    if path not in _CACHE:
        _CACHE[path] = Tokenizer.from_bin(path)
    return _CACHE[path]


def test_our_vocab_matches_sentencepiece_on_2000_stories(data_dir, stories_sample):
    sp = spm.SentencePieceProcessor(model_file=str(data_dir / "tok512.model"))
    tok = Tokenizer.from_bin(data_dir / "tok512.bin")
    assert sp.vocab_size() == 512 and tok.vocab_size == 512
    assert len(stories_sample) == 2000
    for s in stories_sample:
        ids = tok.encode(s, bos=True)
        assert ids == [1, *sp.encode(s)]
        assert tok.decode(ids) == s


def test_training_conventions(data_dir):
    sp = load_sentencepiece(data_dir / "tok512.model")
    assert [sp.id_to_piece(i) for i in range(3)] == ["<unk>", "<s>", "</s>"]
    assert sp.id_to_piece(3) == "<0x00>" and sp.id_to_piece(258) == "<0xFF>"
    assert sp.decode(sp.encode("a  b")) == "a  b"   # whitespace kept (no normalization)


def test_digits_are_split(tmp_path, stories_sample):
    docs = stories_sample[:300] + [f"In {1000 + i} there were {i * 37} cats." for i in range(500)]
    sp = load_sentencepiece(train_tokenizer(docs, tmp_path / "d", vocab_size=400))
    pieces = [sp.id_to_piece(i) for i in range(259, sp.vocab_size())]   # past the bytes
    assert all(sum(c.isdigit() for c in p) <= 1 for p in pieces)
    assert sp.encode("2024") == [sp.piece_to_id(p) for p in ["▁2", "0", "2", "4"]] or \
        sp.encode("2024") == [sp.piece_to_id(p) for p in ["▁", "2", "0", "2", "4"]]


def test_sentences_respect_the_limit():
    doc = ("word " * 3000).strip() + ". Short one.\nSecond line."
    parts = list(sentences([doc], max_bytes=100))
    assert all(len(p.encode()) <= 100 for p in parts)
    assert "".join(p.replace(" ", "") for p in parts) == doc.replace(" ", "").replace("\n", "")


def test_tokenizer_bin_layout_by_hand(tmp_path, data_dir):
    """Parse tokenizer.bin with struct, independently of read_tokenizer_bin."""
    sp = spm.SentencePieceProcessor(model_file=str(data_dir / "tok512.model"))
    raw = (data_dir / "tok512.bin").read_bytes()
    (max_len,), off, pieces = struct.unpack_from("i", raw), 4, []
    while off < len(raw):
        score, n = struct.unpack_from("fi", raw, off)
        pieces.append((score, raw[off + 8: off + 8 + n]))
        off += 8 + n
    assert len(pieces) == 512 and max_len == max(len(p) for _, p in pieces)
    assert pieces[1][1] == b"\n<s>\n" and pieces[2][1] == b"\n</s>\n"
    for i in (3, 300, 511):
        assert pieces[i][1] == sp.id_to_piece(i).replace("▁", " ").encode()
        assert pieces[i][0] == pytest.approx(sp.get_score(i))


def test_stream_holds_back_partial_utf8(llama2_bin):
    tok = Tokenizer.from_bin(llama2_bin)
    ids = tok.encode("🦙 llama", bos=True)
    chunks = list(tok.stream(ids[1:]))
    assert "".join(chunks) == "🦙 llama" and "\ufffd" not in "".join(chunks)


# ----------------------------------------------------------------------------------------------
# bad input

def test_lone_surrogate_is_an_error(data_dir):
    tok = Tokenizer.from_bin(data_dir / "tok512.bin")
    with pytest.raises(TokenizerError, match="lone surrogate"):
        tok.encode("abc\ud800def")


def test_invalid_utf8_decodes_with_replacement(data_dir):
    tok = Tokenizer.from_bin(data_dir / "tok512.bin")
    assert tok.decode([1, 3 + 0xFF, 3 + 0x41]) == "\ufffdA"   # documented: U+FFFD


def test_vocab_too_small(tmp_path):
    with pytest.raises(TokenizerError, match="at least 259"):
        train_tokenizer(["hello world"], tmp_path / "t", vocab_size=100)
    with pytest.raises(TokenizerError, match=r"distinct characters; use at least \d+"):
        train_tokenizer(["hello world, the quick brown fox"], tmp_path / "t", vocab_size=260)


def test_missing_and_corrupt_model(tmp_path):
    with pytest.raises(TokenizerError, match="no such SentencePiece model"):
        export_tokenizer_bin(tmp_path / "nope.model", tmp_path / "o.bin")
    bad = tmp_path / "bad.model"
    bad.write_bytes(b"\x00garbage" * 10)
    with pytest.raises(TokenizerError, match="not a valid SentencePiece model"):
        export_tokenizer_bin(bad, tmp_path / "o.bin")


@pytest.mark.parametrize("cut,msg", [(2, "truncated"), (4 + 5, "truncated record header"),
                                     (4 + 8 + 3, "needs")])
def test_truncated_bin(tmp_path, data_dir, cut, msg):
    raw = (data_dir / "tok512.bin").read_bytes()
    (tmp_path / "t.bin").write_bytes(raw[:cut])
    with pytest.raises(TokenizerError, match=msg):
        read_tokenizer_bin(tmp_path / "t.bin")


def test_corrupt_bin_length_and_count(tmp_path, data_dir):
    raw = bytearray((data_dir / "tok512.bin").read_bytes())
    raw[8:12] = struct.pack("i", 10**6)   # the first token's length
    (tmp_path / "t.bin").write_bytes(raw)
    with pytest.raises(TokenizerError, match="offset 8: token 0 has length 1000000"):
        read_tokenizer_bin(tmp_path / "t.bin")
    with pytest.raises(TokenizerError, match="has 512 tokens, expected 600"):
        read_tokenizer_bin(data_dir / "tok512.bin", vocab_size=600)
    with pytest.raises(TokenizerError, match="cannot read"):
        read_tokenizer_bin(tmp_path / "missing.bin")
