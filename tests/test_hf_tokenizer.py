"""save_hf_tokenizer: transformers' fast tokenizer gives sentencepiece's ids, BOS first.

The expected ids come from sentencepiece itself (plus BOS = 1), never from the converter."""

from __future__ import annotations

import random

import pytest

from babyllama.tokenizer import TokenizerError, load_sentencepiece, save_hf_tokenizer

transformers = pytest.importorskip("transformers")

EDGE = [
    "", " ", "  ", "a", " leading space", "   three leading", "trailing space ", "trailing   ",
    "multiple   spaces    inside", "line one\nline two", "\n", "\n\nblank lines\n\n", "\ttab\t",
    "emoji 😀🎉👩‍👩‍👧 in text", "日本語のテキスト、中文字符", "한국어", "Ünïcödé àccents",
    "control \x00\x01\x07\x1b\x7f chars", "zero\u200bwidth\ufeffbom", "▁ the sentencepiece space",
    "<s> literal specials </s> <unk>", "<0x41> looks like a byte piece", "digits 1234567890 3.14",
    "x" * 300, "  ".join(["ab"] * 50), "Ωμέγα Привет مرحبا שלום नमस्ते", "\r\nwindows\r\n",
    "tabs\tand  \n  mixed \t whitespace ", "a\u0301 combining", "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 math letters",
]


def _random_texts(n: int, seed: int = 0) -> list[str]:
    """Strings mixing ASCII, spaces and rare code points: byte fallback everywhere."""
    rng = random.Random(seed)
    alphabet = list("abcdefghij  ETAOIN.,!?\n\t") + ["é", "ß", "😀", "中", "\x03", "ק", "🦙"]
    return ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 60))) for _ in range(n)]


def _check(model_path, out_dir, texts: list[str]) -> None:
    save_hf_tokenizer(model_path, out_dir)
    fast = transformers.AutoTokenizer.from_pretrained(out_dir)
    assert fast.is_fast
    sp = load_sentencepiece(model_path)
    bad = []
    for t in texts:
        want = [sp.bos_id()] + sp.encode(t)
        got = fast(t)["input_ids"]
        if got != want:
            bad.append((t, got, want))
    assert not bad, f"{len(bad)} of {len(texts)} texts differ, e.g. {bad[:2]}"
    assert fast.bos_token_id == sp.bos_id() and fast.eos_token_id == sp.eos_id()
    # decoding gives the text back (without the special BOS)
    for t in ("Once upon a time,  there\nwas 😀 中文", " lead"):
        assert fast.decode(fast(t)["input_ids"], skip_special_tokens=True) == sp.decode(
            sp.encode(t))


def test_llama2_tokenizer(llama2_model, stories_sample, tmp_path):
    _check(llama2_model, tmp_path / "hf", EDGE + stories_sample[:300] + _random_texts(300))


def test_book_tokenizer_on_held_out_stories(data_dir, tmp_path):
    from babyllama import data as D

    _, val = D.load_corpus("stories", data_dir)   # never seen when the tokenizer was trained
    _check(data_dir / "tok512.model", tmp_path / "hf", EDGE + val[:400] + _random_texts(300, 1))


def test_refuses_what_it_cannot_reproduce(tmp_path):
    import io

    import sentencepiece as spm

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(["hello world", "a b c"] * 50),
                                   model_writer=buf, vocab_size=15, model_type="unigram",
                                   minloglevel=2)
    (tmp_path / "uni.model").write_bytes(buf.getvalue())
    with pytest.raises(TokenizerError, match=r"model_type = 1 \(need 2\).*normalizer = "
                                             r"'nmt_nfkc'"):
        save_hf_tokenizer(tmp_path / "uni.model", tmp_path / "hf")
    assert not (tmp_path / "hf").exists()
    with pytest.raises(TokenizerError, match="no such SentencePiece model"):
        save_hf_tokenizer(tmp_path / "missing.model", tmp_path / "hf")


def test_export_hf_writes_the_tokenizer_beside_the_model(data_dir, tmp_path):
    """`babyllama export CKPT --hf DIR --tokenizer TOK.model`: model and tokenizer, one dir."""
    from babyllama.cli import main
    from babyllama.model import PRESETS, ModelArgs, Transformer

    tok = data_dir / "tok512.model"
    m = Transformer(PRESETS["stories260K"])
    m.save_pretrained(tmp_path / "src")
    assert main(["export", str(tmp_path / "src"), "--hf", str(tmp_path / "hf"),
                 "--tokenizer", str(tok)]) == 0
    fast = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    sp = load_sentencepiece(tok)
    assert fast("Once upon a time")["input_ids"] == [1] + sp.encode("Once upon a time")
    wrong = Transformer(ModelArgs(dim=32, n_layers=1, n_heads=4, vocab_size=300))
    with pytest.raises(TokenizerError, match="512 pieces, but the model's vocab_size is 300"):
        wrong.save_pretrained(tmp_path / "wrong", tokenizer=tok)
    assert not (tmp_path / "wrong").exists()
