"""Chapter 01: the tokenizer. SentencePiece BPE training, llama2.c's tokenizer.bin, our own BPE.

    from babyllama.tokenizer import train_tokenizer, export_tokenizer_bin, Tokenizer
    model = train_tokenizer(stories, "out/tok512", vocab_size=512)   # -> out/tok512.model
    export_tokenizer_bin(model, "out/tok512.bin")
    tok = Tokenizer.from_bin("out/tok512.bin")
    tok.encode("Once upon a time", bos=True)  # the same ids as sentencepiece

    babyllama tokenizer train --vocab 512 --data stories --out out/tok512
    babyllama tokenizer export MODEL.model OUT.bin

Training uses Llama 2's conventions: BPE, byte fallback (a character the vocabulary lacks is
spelled as its UTF-8 bytes, pieces <0x00>..<0xFF>), identity normalization, digits split,
whitespace kept as '▁', unk/bos/eos = 0/1/2. `Tokenizer` is a pure-Python encoder and decoder
that reads only tokenizer.bin, as llama2.c's run.c does, and gives exactly sentencepiece's ids.
"""

from __future__ import annotations

import codecs
import heapq
import io
import re
import struct
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path

from babyllama.files import read_regular_file

N_SPECIAL = 3          # <unk> <s> </s>
N_BYTES = 256          # <0x00> .. <0xFF>
BOS, EOS = 1, 2
MAX_SENTENCE_BYTES = 4192   # sentencepiece's default max_sentence_length: longer lines are dropped
BYTE_PIECE = re.compile(rb"<0x([0-9A-F]{2})>")
MAX_BIN_BYTES = 1 << 30     # a plausible tokenizer.bin (Llama 2's is 434 KB); the C reader's too


class TokenizerError(ValueError):
    pass


# ----------------------------------------------------------------------------------------------
# training

def sentences(docs: Iterable[str], max_bytes: int = MAX_SENTENCE_BYTES) -> Iterator[str]:
    """Split documents into lines of at most `max_bytes` UTF-8 bytes.

    SentencePiece trains on "sentences" and silently skips any longer than max_sentence_length,
    so a corpus of long documents would lose exactly its longest stories. We cut at newlines,
    then at sentence ends, then (a last resort) anywhere, so that no text is dropped."""
    for doc in docs:
        for line in doc.split("\n"):
            if len(line.encode("utf-8")) <= max_bytes:
                if line:
                    yield line
                continue
            chunk = ""
            for sent in re.split(r"(?<=[.!?])\s+", line):
                if len((chunk + " " + sent).encode("utf-8")) <= max_bytes:
                    chunk = f"{chunk} {sent}" if chunk else sent
                    continue
                if chunk:
                    yield chunk
                while len(sent.encode("utf-8")) > max_bytes:   # one enormous "sentence"
                    cut = sent.encode("utf-8")[:max_bytes].decode("utf-8", "ignore")
                    yield cut
                    sent = sent[len(cut):]
                chunk = sent
            if chunk:
                yield chunk


def train_tokenizer(docs: Iterable[str], out_prefix: str | Path, vocab_size: int = 512,
                    num_threads: int = 2) -> Path:
    """Train a Llama 2-style SentencePiece BPE model; returns the path of `out_prefix.model`."""
    import sentencepiece as spm

    if not N_SPECIAL + N_BYTES <= vocab_size <= 65535:
        raise TokenizerError(f"vocab_size {vocab_size} out of range: byte fallback needs at least "
                             f"{N_SPECIAL + N_BYTES} pieces (3 special + 256 bytes), and token "
                             f"ids must fit in uint16 (at most 65535)")
    lines = list(sentences(docs))
    if not lines:
        raise TokenizerError("cannot train a tokenizer on an empty corpus")
    n_chars = len(Counter(c for line in lines for c in line) | Counter("▁"))
    if vocab_size < N_SPECIAL + N_BYTES + n_chars:
        raise TokenizerError(
            f"vocab_size {vocab_size} is too small for this corpus: byte fallback needs "
            f"{N_SPECIAL + N_BYTES} pieces and the corpus has {n_chars} distinct characters; "
            f"use at least {N_SPECIAL + N_BYTES + n_chars}")
    out = Path(out_prefix).with_suffix(".model")
    out.parent.mkdir(parents=True, exist_ok=True)
    model = io.BytesIO()
    spm.set_random_generator_seed(0)   # reproducible sampling and shuffling
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(lines), model_writer=model, vocab_size=vocab_size,
            model_type="bpe", byte_fallback=True, normalization_rule_name="identity",
            split_digits=True, allow_whitespace_only_pieces=True, remove_extra_whitespaces=False,
            add_dummy_prefix=True, character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2,
            pad_id=-1, max_sentence_length=MAX_SENTENCE_BYTES, input_sentence_size=2_000_000,
            shuffle_input_sentence=True, num_threads=num_threads, minloglevel=2)
    except RuntimeError as e:
        raise TokenizerError(f"sentencepiece could not train a {vocab_size}-piece vocabulary: "
                             f"{str(e).strip().splitlines()[-1]}") from e
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_bytes(model.getvalue())
    tmp.replace(out)
    return out


def load_sentencepiece(path: str | Path):
    """A SentencePieceProcessor, with a clear error for a missing or corrupt file."""
    import sentencepiece as spm

    path = Path(path)
    if not path.is_file():
        raise TokenizerError(f"{path}: no such SentencePiece model file")
    try:
        return spm.SentencePieceProcessor(model_file=str(path))
    except (RuntimeError, OSError) as e:
        raise TokenizerError(f"{path}: not a valid SentencePiece model ({e})") from e


# ----------------------------------------------------------------------------------------------
# tokenizer.bin: int32 max_token_length, then per token: float32 score, int32 length, bytes

def export_tokenizer_bin(model_path: str | Path, out: str | Path) -> Path:
    """Write llama2.c's tokenizer.bin for a SentencePiece model (as llama2.c's tokenizer.py)."""
    sp = load_sentencepiece(model_path)
    out = Path(out)
    if out.is_dir():
        raise TokenizerError(f"{out}: is a directory; expected the path of the tokenizer.bin "
                             f"to write")
    pieces, scores = [], []
    for i in range(sp.vocab_size()):
        try:
            piece = sp.id_to_piece(i)
        except UnicodeDecodeError as e:
            raise TokenizerError(f"{model_path}: piece {i} is not valid UTF-8 ({e.reason} at "
                                 f"byte {e.start}): a corrupt SentencePiece model?") from None
        if i == sp.bos_id():
            piece = "\n<s>\n"      # run.c never matches these when encoding text
        elif i == sp.eos_id():
            piece = "\n</s>\n"
        pieces.append(piece.replace("▁", " ").encode("utf-8"))
        scores.append(sp.get_score(i))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(struct.pack("I", max(len(p) for p in pieces)))
            for p, s in zip(pieces, scores):
                f.write(struct.pack("fI", s, len(p)))
                f.write(p)
        tmp.replace(out)
    except BaseException:   # a full disk, a signal: no half-written temporary left behind
        tmp.unlink(missing_ok=True)
        raise
    return out


def read_tokenizer_bin(path: str | Path, vocab_size: int | None = None
                       ) -> tuple[list[bytes], list[float], int]:
    """(pieces, scores, max_token_length) of a tokenizer.bin, validated field by field.

    The file does not store its vocabulary size: it is the number of records up to the end."""
    path = Path(path)
    data = _read_regular_file(path)
    (max_len,) = struct.unpack_from("i", data, 0)
    if not 0 < max_len <= 1 << 16:
        raise TokenizerError(f"{path}: offset 0: max_token_length {max_len} is not plausible")
    pieces, scores, off, longest = [], [], 4, 0
    while off < len(data) and (vocab_size is None or len(pieces) < vocab_size):
        if off + 8 > len(data):
            raise TokenizerError(f"{path}: offset {off}: truncated record header for token "
                                 f"{len(pieces)} (need 8 bytes, have {len(data) - off})")
        score, n = struct.unpack_from("fi", data, off)
        if not 0 <= n <= max_len:
            raise TokenizerError(f"{path}: offset {off + 4}: token {len(pieces)} has length {n}, "
                                 f"expected 0..{max_len}")
        if score != score:
            raise TokenizerError(f"{path}: offset {off}: token {len(pieces)} has a NaN score")
        if off + 8 + n > len(data):
            raise TokenizerError(f"{path}: offset {off + 8}: token {len(pieces)} needs {n} bytes, "
                                 f"only {len(data) - off - 8} left")
        pieces.append(data[off + 8: off + 8 + n])
        scores.append(score)
        longest = max(longest, n)
        off += 8 + n
    if vocab_size is not None and len(pieces) < vocab_size:
        raise TokenizerError(f"{path}: has {len(pieces)} tokens, expected {vocab_size}")
    if len(pieces) < N_SPECIAL:
        raise TokenizerError(f"{path}: has only {len(pieces)} tokens")
    # every exporter writes the longest piece's length: a file cut at a record boundary usually
    # lost that piece, and would otherwise pass for a smaller vocabulary
    if longest != max_len:
        raise TokenizerError(f"{path}: offset 0: max_token_length {max_len}, but the longest of "
                             f"the {len(pieces)} pieces has {longest} bytes (truncated?)")
    return pieces, scores, max_len


def _read_regular_file(path: Path) -> bytes:
    """The bytes of a regular file of plausible size (not a FIFO, not /dev/zero)."""
    size, data = read_regular_file(path, TokenizerError, "tokenizer file", max_size=MAX_BIN_BYTES)
    if size < 4:
        raise TokenizerError(f"{path}: truncated: {size} bytes, expected at least a 4-byte header")
    return data


# ----------------------------------------------------------------------------------------------
# our own encoder and decoder

class Tokenizer:
    """BPE over tokenizer.bin: greedy merging of the best-scoring adjacent pair, as run.c does."""

    def __init__(self, pieces: list[bytes], scores: list[float]):
        self.pieces, self.scores = pieces, scores
        self.vocab_size = len(pieces)
        # byte fallback: <0x00>..<0xFF> at ids 3..258, as sentencepiece lays them out
        self.byte_fallback = self.vocab_size >= N_SPECIAL + N_BYTES and all(
            pieces[N_SPECIAL + b] == b"<0x%02X>" % b for b in range(N_BYTES))
        first_normal = N_SPECIAL + (N_BYTES if self.byte_fallback else 0)
        # only normal pieces take part in merges: never <unk>, <s>, </s> or a byte piece
        self.lookup: dict[str, int] = {}
        for i in range(first_normal, self.vocab_size):
            try:
                self.lookup.setdefault(pieces[i].decode("utf-8"), i)
            except UnicodeDecodeError:
                continue

    @classmethod
    def from_bin(cls, path: str | Path, vocab_size: int | None = None) -> Tokenizer:
        pieces, scores, _ = read_tokenizer_bin(path, vocab_size)
        return cls(pieces, scores)

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        """Token ids of `text`; exactly what sentencepiece gives (with the dummy-prefix space).

        Lone surrogates are not text and raise. U+2581 '▁' is sentencepiece's own spelling of a
        space, so it encodes (and decodes) as a space, as in sentencepiece."""
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            raise TokenizerError(f"cannot encode text with a lone surrogate {text[e.start]!r} at "
                                 f"index {e.start}: it is not valid Unicode") from e
        ids = [BOS] if bos else []
        if text:
            ids += self._bpe(" " + text.replace("▁", " "))
        if eos:
            ids.append(EOS)
        return ids

    def _bpe(self, text: str) -> list[int]:
        # symbols: a doubly linked list of strings, initially one per character
        sym = list(text)
        prev = list(range(-1, len(sym) - 1))
        nxt = list(range(1, len(sym) + 1))
        nxt[-1] = -1
        heap: list[tuple[float, int, int, str]] = []

        def push(i: int) -> None:
            j = nxt[i]
            # a character the vocabulary lacks is no piece and takes part in no merge: run.c
            # spells it in bytes first (sentencepiece vocabularies contain their characters)
            if j != -1 and sym[i] in self.lookup and sym[j] in self.lookup:
                merged = sym[i] + sym[j]
                t = self.lookup.get(merged)
                if t is not None:   # ties go to the leftmost pair, as in run.c and sentencepiece
                    heapq.heappush(heap, (-self.scores[t], i, j, merged))

        for i in range(len(sym) - 1):
            push(i)
        while heap:
            _, i, j, merged = heapq.heappop(heap)
            if nxt[i] != j or sym[i] + sym[j] != merged:   # stale: a neighbour already merged
                continue
            sym[i], sym[j] = merged, ""
            nxt[i] = nxt[j]
            if nxt[j] != -1:
                prev[nxt[j]] = i
            if prev[i] != -1:
                push(prev[i])
            push(i)
        ids: list[int] = []
        i = 0
        while i != -1:
            t = self.lookup.get(sym[i])
            if t is not None:
                ids.append(t)
            elif self.byte_fallback:
                ids.extend(N_SPECIAL + b for b in sym[i].encode("utf-8"))
            else:
                ids.append(0)   # <unk>
            i = nxt[i]
        return ids

    def piece_bytes(self, prev: int, token: int) -> bytes:
        """The bytes token `token` stands for, after `prev` (run.c's decode)."""
        if not 0 <= token < self.vocab_size:
            raise TokenizerError(f"token id {token} outside the vocabulary [0, {self.vocab_size})")
        if token in (BOS, EOS):
            return b""
        piece = self.pieces[token]
        if prev == BOS and piece.startswith(b" "):   # the dummy prefix is not part of the text
            piece = piece[1:]
        m = BYTE_PIECE.fullmatch(piece) if self.byte_fallback and token < 259 else None
        return bytes([int(m.group(1), 16)]) if m else piece

    def decode(self, ids: list[int]) -> str:
        """Text of `ids`; the dummy-prefix space is dropped at the start and after BOS."""
        out = bytearray()
        prev = BOS   # a sequence without BOS starts as if after one
        for t in ids:
            out += self.piece_bytes(prev, t)
            prev = t
        return out.decode("utf-8", errors="replace")

    def stream(self, ids: Iterable[int], prev: int = BOS) -> Iterator[str]:
        """Decode tokens as they come, holding back incomplete UTF-8 sequences."""
        dec = codecs.getincrementaldecoder("utf-8")(errors="replace")
        for t in ids:
            text = dec.decode(self.piece_bytes(prev, t))
            prev = t
            if text:
                yield text
        tail = dec.decode(b"", final=True)
        if tail:
            yield tail


# ----------------------------------------------------------------------------------------------
# Hugging Face: tokenizer.json for the fast (Rust) tokenizer, built from the SentencePiece model

def _proto_fields(buf: bytes) -> Iterator[tuple[int, int, int | bytes]]:
    """(field number, wire type, value) of a protobuf message: just enough to read the few
    settings of a SentencePiece model that decide how text is encoded (no protobuf needed)."""
    i = 0

    def varint() -> int:
        nonlocal i
        out = shift = 0
        while True:
            b = buf[i]
            i += 1
            out |= (b & 0x7F) << shift
            shift += 7
            if b < 0x80:
                return out

    while i < len(buf):
        key = varint()
        field, wire = key >> 3, key & 7
        if wire == 0:
            yield field, wire, varint()
        elif wire == 2:
            n = varint()
            yield field, wire, buf[i:i + n]
            i += n
        elif wire in (1, 5):
            i += 8 if wire == 1 else 4
        else:
            raise TokenizerError(f"unexpected protobuf wire type {wire}")


def sentencepiece_settings(path: str | Path) -> dict[str, object]:
    """model_type, byte_fallback, normalizer name, add_dummy_prefix, remove_extra_whitespaces,
    with sentencepiece's defaults where the file leaves a field out."""
    s: dict[str, object] = {"model_type": 1, "byte_fallback": False, "normalizer": "nmt_nfkc",
                            "add_dummy_prefix": True, "remove_extra_whitespaces": True}
    try:
        for field, _, value in _proto_fields(Path(path).read_bytes()):
            if field == 2:    # TrainerSpec: model_type = 3, byte_fallback = 35
                for f, _, v in _proto_fields(value):
                    if f == 3:
                        s["model_type"] = v
                    elif f == 35:
                        s["byte_fallback"] = bool(v)
            elif field == 3:  # NormalizerSpec: name = 1, add_dummy_prefix = 3, remove_extra_ws = 4
                for f, _, v in _proto_fields(value):
                    if f == 1:
                        s["normalizer"] = v.decode()
                    elif f == 3:
                        s["add_dummy_prefix"] = bool(v)
                    elif f == 4:
                        s["remove_extra_whitespaces"] = bool(v)
    except (IndexError, UnicodeDecodeError) as e:
        raise TokenizerError(f"{path}: cannot read the model's settings ({e})") from e
    return s


def save_hf_tokenizer(sentencepiece_model_path: str | Path, out_dir: str | Path) -> Path:
    """Write tokenizer.json + tokenizer_config.json + special_tokens_map.json into `out_dir`, so
    that transformers' AutoTokenizer (the fast tokenizer) gives sentencepiece's ids, BOS first.

    Only what the fast tokenizer can reproduce exactly is accepted: a BPE model with identity
    normalization and no whitespace collapsing (Llama 2's tokenizer and ours). The merges are
    every split of a vocabulary piece into two pieces, ranked by the merged piece's score,
    which is the pair sentencepiece's BPE merges first."""
    import json

    from tokenizers import AddedToken, decoders, models, normalizers, processors
    from tokenizers import Tokenizer as FastTokenizer

    path = Path(sentencepiece_model_path)
    sp = load_sentencepiece(path)
    cfg = sentencepiece_settings(path)
    wrong = [f"{k} = {cfg[k]!r} (need {v!r})" for k, v in (
        ("model_type", 2), ("normalizer", "identity"), ("remove_extra_whitespaces", False))
        if cfg[k] != v]
    if wrong:
        raise TokenizerError(f"{path}: the fast tokenizer cannot reproduce this model exactly: "
                             + ", ".join(wrong))
    n = sp.vocab_size()
    vocab = {sp.id_to_piece(i): i for i in range(n)}
    normal = {i for i in range(n) if not (sp.is_control(i) or sp.is_unknown(i) or sp.is_byte(i)
                                          or sp.is_unused(i))}
    merges = []
    for i in normal:
        piece = sp.id_to_piece(i)
        for k in range(1, len(piece)):
            left, right = vocab.get(piece[:k]), vocab.get(piece[k:])
            if left in normal and right in normal:
                merges.append((-sp.get_score(i), i, left, right))
    merges.sort()
    bpe = models.BPE(vocab=vocab, merges=[(sp.id_to_piece(l), sp.id_to_piece(r))
                                          for _, _, l, r in merges],
                     unk_token=sp.id_to_piece(sp.unk_id()), fuse_unk=True,
                     byte_fallback=bool(cfg["byte_fallback"]))
    tok = FastTokenizer(bpe)
    steps = [normalizers.Replace(" ", "▁")]
    if cfg["add_dummy_prefix"]:
        steps.insert(0, normalizers.Prepend("▁"))
    tok.normalizer = normalizers.Sequence(steps)
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                     decoders.Fuse()]
                                    + ([decoders.Strip(" ", 1, 0)]
                                       if cfg["add_dummy_prefix"] else []))
    bos, eos, unk = (sp.id_to_piece(sp.bos_id()), sp.id_to_piece(sp.eos_id()),
                     sp.id_to_piece(sp.unk_id()))
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, sp.bos_id())])
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True)
                            for t in (unk, bos, eos)])
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": bos, "eos_token": eos,
              "unk_token": unk, "add_bos_token": True, "add_eos_token": False,
              "clean_up_tokenization_spaces": False, "model_max_length": 1 << 30,
              "legacy": True, "split_special_tokens": True}
    for name, text in (("tokenizer.json", tok.to_str(pretty=True)),
                       ("tokenizer_config.json", json.dumps(config, indent=2)),
                       ("special_tokens_map.json", json.dumps(
                           {"bos_token": bos, "eos_token": eos, "unk_token": unk}, indent=2))):
        tmp = out / (name + ".tmp")
        tmp.write_text(text + "\n", encoding="utf-8")
        tmp.replace(out / name)
    return out
