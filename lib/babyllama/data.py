"""Data: the corpora (built-in stories or TinyStories), pretokenized uint16 shards, batches.

    babyllama corpus --n 20000 --seed 0 --out out/data/stories/stories.jsonl
    babyllama pretokenize --vocab 512 --data stories        # -> out/data/stories_tok512/*.bin

TinyStories is downloaded from the Hugging Face hub with a progress bar, resumed with an HTTP
Range request after an interruption, checked (size, and sha256 when known) and unpacked. This
module never imports torch: the training loop turns the NumPy batches into tensors itself.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import re
import shutil
import tarfile
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from tqdm import tqdm

from babyllama import stories as _stories
from babyllama.tokenizer import BOS, EOS

TINYSTORIES_URL = ("https://huggingface.co/datasets/roneneldan/TinyStories/resolve/main/"
                   "TinyStories_all_data.tar.gz")
DATA_DIR = Path("out/data")
BOOK_STORIES = 20_000      # size of the built-in corpus the book trains on
SHARD_STORIES = 5_000      # stories per pretokenized shard


class DownloadError(RuntimeError):
    pass


# ----------------------------------------------------------------------------------------------
# download with resume

def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _etag_sha256(headers) -> str | None:
    """The hub's LFS ETag is the file's sha256; use it as the checksum when present."""
    for key in ("X-Linked-ETag", "ETag"):
        tag = (headers.get(key) or "").strip('W/"')
        if re.fullmatch(r"[0-9a-f]{64}", tag):
            return tag
    return None


def download(url: str, dest: str | Path, sha256: str | None = None, timeout: float = 30.0,
             chunk_size: int = 1 << 20) -> Path:
    """Download `url` to `dest`, resuming a previous partial download (`dest.part`).

    The file is checked against its announced size and, when known (argument or the server's
    sha256 ETag), its checksum; a bad file is deleted and reported, never returned."""
    dest = Path(dest)
    part = dest.with_name(dest.name + ".part")
    if dest.exists() and (sha256 is None or _sha256(dest) == sha256):
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    have = part.stat().st_size if part.exists() else 0
    req = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    try:
        resp = urllib.request.urlopen(req, timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.code == 416 and have:   # the part is already complete
            part.replace(dest)
            return _verify(dest, sha256, url, None)
        raise DownloadError(f"{url}: HTTP {e.code} {e.reason}") from e
    except (urllib.error.URLError, OSError) as e:
        raise DownloadError(
            f"cannot download {url} ({getattr(e, 'reason', e)}). Offline? The built-in corpus "
            f"needs no network: use --data stories.") from e
    with resp:
        if resp.status == 206:
            m = re.match(r"bytes (\d+)-\d+/(\d+|\*)", resp.headers.get("Content-Range", ""))
            if not m or int(m.group(1)) != have:
                raise DownloadError(f"{url}: server answered a resume from byte {have} with "
                                    f"Content-Range {resp.headers.get('Content-Range')!r}")
            total = int(m.group(2)) if m.group(2) != "*" else None
            mode = "ab"
        else:   # 200: the server ignored the range, start over
            have, mode = 0, "wb"
            length = resp.headers.get("Content-Length")
            total = int(length) if length else None
        sha256 = sha256 or _etag_sha256(resp.headers)
        bar = tqdm(total=total, initial=have, unit="B", unit_scale=True, desc=dest.name)
        with open(part, mode) as f, bar:
            try:
                while block := resp.read(chunk_size):
                    f.write(block)
                    bar.update(len(block))
            except (OSError, urllib.error.URLError) as e:   # includes http.client.IncompleteRead
                raise DownloadError(f"{url}: transfer cut off after {f.tell()} bytes ({e}); "
                                    f"run the same command again to resume") from e
    got = part.stat().st_size
    if total is not None and got != total:
        raise DownloadError(f"{url}: transfer cut off: expected {total} bytes, have {got}; "
                            f"run the same command again to resume")
    part.replace(dest)
    return _verify(dest, sha256, url, total)


def _verify(dest: Path, sha256: str | None, url: str, total: int | None) -> Path:
    if sha256 is not None:
        got = _sha256(dest)
        if got != sha256:
            dest.unlink()
            raise DownloadError(f"{url}: checksum mismatch for {dest}: expected sha256 {sha256}, "
                                f"found {got}; the file was deleted")
    return dest


def unpack(archive: str | Path, out_dir: str | Path) -> Path:
    """Unpack a .tar.gz safely (no absolute paths or `..`); a corrupt archive raises."""
    archive, out_dir = Path(archive), Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + ".unpacking")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        with tarfile.open(archive, "r:*") as tar:
            kwargs = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
            tar.extractall(tmp, **kwargs)
    except (tarfile.TarError, EOFError, OSError) as e:
        raise DownloadError(f"{archive} is not a valid archive ({e}); delete it and download "
                            f"again") from e
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.replace(out_dir)
    return out_dir


def download_tinystories(data_dir: str | Path = DATA_DIR, url: str = TINYSTORIES_URL,
                         sha256: str | None = None) -> Path:
    """Download and unpack TinyStories into `data_dir/TinyStories_all_data/` (data00..49.json)."""
    data_dir = Path(data_dir)
    out = data_dir / "TinyStories_all_data"
    if out.exists() and any(out.glob("*.json")):
        return out
    archive = download(url, data_dir / "TinyStories_all_data.tar.gz", sha256=sha256)
    return unpack(archive, out)


# ----------------------------------------------------------------------------------------------
# corpora: lists of stories, split into train and validation

def corpus_path(data_dir: str | Path = DATA_DIR) -> Path:
    return Path(data_dir) / "stories" / "stories.jsonl"


def write_corpus(path: str | Path, n: int, seed: int) -> Path:
    """Write n generated stories (seed) to `path` as JSON Lines, and beside it `.meta.json`
    saying which n and seed they are, so make_corpus knows the file for what it is."""
    path = Path(path)
    _stories.write_jsonl(_stories.generate_stories(n, seed), path)
    path.with_suffix(".meta.json").write_text(json.dumps({"n": n, "seed": seed}))
    return path


def make_corpus(n: int = BOOK_STORIES, seed: int = 0, data_dir: str | Path = DATA_DIR) -> Path:
    """Write the built-in corpus (reused when it exists with the same size and seed)."""
    path = corpus_path(data_dir)
    meta = path.with_suffix(".meta.json")
    if path.exists():
        try:
            found = json.loads(meta.read_text())
        except (OSError, ValueError):   # no .meta.json, or not JSON
            found = None
        if found == {"n": n, "seed": seed}:
            return path
        what = (f"{found['n']} stories of seed {found['seed']}"
                if isinstance(found, dict) and found.keys() == {"n", "seed"} else
                "stories of unknown size and seed")
        print(f"{path} holds {what}: writing {n} stories of seed {seed} in its place")
    return write_corpus(path, n, seed)


def load_corpus(data: str, data_dir: str | Path = DATA_DIR) -> tuple[list[str], list[str]]:
    """(train, val) stories of the built-in corpus ("stories") or of TinyStories."""
    data_dir = Path(data_dir)
    if data == "stories":
        return _stories.split(_stories.read_jsonl(make_corpus(data_dir=data_dir)))
    if data == "tinystories":
        files = sorted(download_tinystories(data_dir).glob("*.json"))
        val = [d["story"] for d in json.loads(files[0].read_text())]
        train = [d["story"] for f in files[1:] for d in json.loads(f.read_text())]
        return train, val
    raise ValueError(f"unknown data set {data!r}: expected 'stories' or 'tinystories'")


# the chat turns a tokenizer also learns from: in a 512-piece vocabulary trained on stories
# alone, "[INST]", "story" and "about" are spelled letter by letter and a request costs ~58
# tokens; with 20,000 requests beside the stories, ~41 (and stories ~2% more tokens)
TOKENIZER_REQUESTS = 20_000


def tokenizer_docs(train: list[str], requests: int = TOKENIZER_REQUESTS) -> list[str]:
    """The text a tokenizer is trained on: the training stories, then `requests` chat turns
    ("[INST] request [/INST]", as chat mode renders them) from the fine-tuning side of the
    request generator — a tokenizer should know the text its model will be prompted with."""
    from babyllama.chat import render_turn

    if requests <= 0:
        return list(train)
    turns = [render_turn(req.text)
             for req, _ in _stories.generate_requests(requests, REQUEST_SEEDS["train"])]
    return [*train, *turns]


# ----------------------------------------------------------------------------------------------
# pretokenized shards: uint16 token ids, BOS (id 1) at the start of each story

def shard_dir(data: str, vocab_size: int, data_dir: str | Path = DATA_DIR) -> Path:
    return Path(data_dir) / f"{data}_tok{vocab_size}"


def _encode_shard(args: tuple[str, list[str], str]) -> int:
    import sentencepiece as spm  # in the worker process

    model_path, texts, out = args
    sp = spm.SentencePieceProcessor(model_file=model_path)
    ids = [[sp.bos_id(), *t] for t in sp.encode(texts)]
    arr = np.fromiter((i for seq in ids for i in seq), dtype=np.uint16)
    tmp = out + ".tmp"
    arr.tofile(tmp)
    os.replace(tmp, out)
    return arr.size


def pretokenize(train: list[str], val: list[str], model_path: str | Path, out_dir: str | Path,
                shard_stories: int = SHARD_STORIES, workers: int | None = None,
                progress: bool = True) -> Path:
    """Encode stories with a SentencePiece model into out_dir/{train,val}_NNN.bin (uint16)."""
    import sentencepiece as spm

    vocab_size = spm.SentencePieceProcessor(model_file=str(model_path)).vocab_size()
    if vocab_size > 65536:
        raise ValueError(f"vocabulary of {vocab_size} does not fit in uint16 shards")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    jobs = []
    for split, texts in (("train", train), ("val", val)):
        for k in range(0, len(texts), shard_stories):
            out = out_dir / f"{split}_{k // shard_stories:03d}.bin"
            jobs.append((str(model_path), texts[k:k + shard_stories], str(out)))
    workers = workers or min(len(jobs), os.cpu_count() or 1)
    with ProcessPoolExecutor(workers) as pool:
        total = sum(tqdm(pool.map(_encode_shard, jobs), total=len(jobs), desc="pretokenize",
                         unit="shard", disable=not progress))
    (out_dir / "meta.json").write_text(json.dumps(
        {"vocab_size": vocab_size, "tokens": int(total), "model": str(model_path)}))
    return out_dir


def load_shards(bin_dir: str | Path, split: str) -> list[np.memmap]:
    """Memory-map every shard of a split; a clear error when there are none."""
    files = sorted(glob.glob(str(Path(bin_dir) / f"{split}_*.bin")))
    if not files:
        raise FileNotFoundError(
            f"no {split} shards in {bin_dir}; make them with "
            f"`babyllama pretokenize --vocab N --data stories` (or tinystories)")
    return [np.memmap(f, dtype=np.uint16, mode="r") for f in files]


def get_batch(shards: list[np.memmap], batch_size: int, seq_len: int, seed: int,
              step: int) -> tuple[np.ndarray, np.ndarray]:
    """The batch of step `step`: random windows (x, y = x shifted by one), int64 (B, T).

    A pure function of (seed, step): resuming at step k sees exactly the batches it would have
    seen, and a data-parallel rank takes its rows of the same global batch."""
    rng = np.random.default_rng([seed, step])
    sizes = np.array([len(s) for s in shards])
    if (sizes <= seq_len).all():
        raise ValueError(f"shards have at most {sizes.max()} tokens, fewer than seq_len + 1 = "
                         f"{seq_len + 1}")
    which = rng.choice(len(shards), size=batch_size, p=np.maximum(sizes - seq_len, 0) /
                       np.maximum(sizes - seq_len, 0).sum())
    x = np.empty((batch_size, seq_len), dtype=np.int64)
    y = np.empty((batch_size, seq_len), dtype=np.int64)
    for b, s in enumerate(which):
        i = rng.integers(0, sizes[s] - seq_len)
        chunk = np.asarray(shards[s][i:i + seq_len + 1], dtype=np.int64)
        x[b], y[b] = chunk[:-1], chunk[1:]
    return x, y


def iter_batches(bin_dir: str | Path, split: str, batch_size: int, seq_len: int, seed: int = 0,
                 start: int = 0) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    shards = load_shards(bin_dir, split)
    step = start
    while True:
        yield get_batch(shards, batch_size, seq_len, seed, step)
        step += 1


# ----------------------------------------------------------------------------------------------
# instruction tuning: "[INST] request [/INST] story</s>" rows, the loss on the story only

IGNORE = -1              # Transformer.forward's ignore_index: no loss at these targets
REQUEST_SEEDS = {"train": 0, "val": 1}   # both from the training side of the held-out split


def encode_request(tok, request: str, story: str) -> tuple[list[int], int]:
    """(ids, n_prompt): BOS + the chat turn exactly as chat mode encodes it, then the story and
    EOS; the first n_prompt ids are the prompt."""
    from babyllama.chat import encode_turn

    prompt = encode_turn(tok, request)
    return prompt + tok.encode(story, bos=False, eos=True), len(prompt)


class WordCachedEncoder:
    """tok.encode, remembering the ids of each word: encoding thousands of request stories
    with the pure-Python BPE took seconds of every fine-tuning run, and the stories reuse a
    vocabulary of ~1,600 words.

    Exact, not approximate: encode(text) is BPE over " " + text, and a merge joins two
    adjacent symbols into a vocabulary piece. When no piece has a space after its first
    character (sentencepiece's split_by_whitespace, checked here), no merge can join a space
    to what precedes it, so the text splits at each space into segments " word" that merge
    independently of each other, in the same order as they would alone (the best pair of
    the whole text is the best of its own segment): BPE of the text is the concatenation of
    the BPE of its segments, and tok.encode(word, bos=False) is BPE of " word". Texts this
    argument does not cover (a '▁', two spaces in a row, a space at either end) go to
    tok.encode whole."""

    def __init__(self, tok):
        self.tok = tok
        pieces = getattr(tok, "lookup", None)   # babyllama.tokenizer.Tokenizer's merge pieces
        self.exact = pieces is not None and all(" " not in p[1:] for p in pieces)
        self.words: dict[str, list[int]] = {}

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        if not self.exact or not text or "\u2581" in text or "  " in text or \
                text[0] == " " or text[-1] == " ":
            return self.tok.encode(text, bos=bos, eos=eos)
        ids = [BOS] if bos else []
        for word in text.split(" "):
            if word not in self.words:
                self.words[word] = self.tok.encode(word, bos=False)
            ids += self.words[word]
        if eos:
            ids.append(EOS)
        return ids


def request_rows(tok, n: int, seq_len: int, seed: int = 0,
                 held_out: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """x, y (n, seq_len) int64: y is x shifted by one, IGNORE on the prompt and the padding.

    A pair longer than seq_len + 1 tokens is skipped (deterministically), never truncated: the
    model must see every answer end with EOS."""
    x = np.zeros((n, seq_len), dtype=np.int64)
    y = np.full((n, seq_len), IGNORE, dtype=np.int64)
    tok = WordCachedEncoder(tok)   # the same ids, several times faster
    row = 0
    for tried, (req, story) in enumerate(_stories.iter_requests(seed, held_out)):
        if row == n:
            break
        if tried >= 4 * n + 100:
            raise ValueError(f"request stories do not fit in seq_len {seq_len}: only {row} of "
                             f"{tried} (request, story) pairs are at most {seq_len + 1} tokens")
        ids, n_prompt = encode_request(tok, req.text, story)
        if len(ids) > seq_len + 1:
            continue
        x[row, :len(ids) - 1] = ids[:-1]
        y[row, n_prompt - 1:len(ids) - 1] = ids[n_prompt:]   # targets: story tokens and EOS
        row += 1
    return x, y


def get_request_batch(rows: tuple[np.ndarray, np.ndarray], batch_size: int, seq_len: int,
                      seed: int, step: int, head: int = 0, head_share: float = 0.0
                      ) -> tuple[np.ndarray, np.ndarray]:
    """get_batch for request rows: random rows, a pure function of (seed, step), cut after the
    last position any of them trains on (the rest is padding: causal attention never lets it
    change an earlier position, so this only saves time).

    With head > 0, a share head_share of the steps (drawn from the same (seed, step)) trains
    only on the first `head` answer tokens of each row: the opening that restates the request,
    where the copying is learned, at a fraction of a full row's cost. No EOS is taught there, so
    the model still learns from the full steps where a story ends."""
    x, y = rows
    if x.shape[1] != seq_len:
        raise ValueError(f"request rows have {x.shape[1]} positions, expected seq_len {seq_len}")
    rng = np.random.default_rng([seed, step])
    pick = rng.integers(0, len(x), batch_size)
    x, y = x[pick], y[pick]
    if head > 0 and rng.random() < head_share:
        first = (y != IGNORE).argmax(1)                       # (B,) first answer target
        y = np.where(np.arange(seq_len) < (first + head)[:, None], y, IGNORE)
    width = int(np.flatnonzero((y != IGNORE).any(0)).max()) + 1
    return x[:, :width], y[:, :width]
