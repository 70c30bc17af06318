"""Checkpoints that cannot lie: bad flags refused, junk and corrupt ckpt.pt named, failed writes
leaving no temporary behind (issue 16, items 7 and 8)."""

from __future__ import annotations

import errno
import struct
import zipfile
from types import SimpleNamespace

import pytest
import torch

from babyllama import cli
from babyllama import train as T
from babyllama.checkpoints import CheckpointError, read_checkpoint
from babyllama.model import Transformer
from babyllama.train import TrainConfig, train


def bl(capsys, *args) -> SimpleNamespace:
    """`babyllama ARGS` in this process (what the command prints, and its exit status): any
    exception it does not turn into a message fails the test with its traceback."""
    capsys.readouterr()
    try:
        code = cli.main([str(a) for a in args])
    except SystemExit as e:   # argparse's usage errors
        code = e.code
    out, err = capsys.readouterr()
    return SimpleNamespace(returncode=code, stdout=out, stderr=err)


def _cfg(data_dir, out, **kw) -> TrainConfig:
    base = dict(preset="stories260K", out_dir=str(out), data_dir=str(data_dir), max_seq_len=32,
                batch_size=2, max_iters=2, eval_interval=0, eval_iters=1, warmup_iters=1,
                progress=False)
    base.update(kw)
    return TrainConfig(**base)


@pytest.fixture(scope="module")
def ckpt(data_dir, tmp_path_factory):
    return train(_cfg(data_dir, tmp_path_factory.mktemp("run")))


@pytest.mark.parametrize("args,msg", [
    (["train", "--max-iters", "-1"], "argument --max-iters: expected an integer >= 0, got -1"),
    (["train", "--grad-accum", "0"], "argument --grad-accum: expected an integer >= 1, got 0"),
    (["train", "--batch-size", "0"], "argument --batch-size: expected an integer >= 1, got 0"),
    (["train", "--eval-iters", "0"], "argument --eval-iters: expected an integer >= 1, got 0"),
    (["train", "--log-interval", "0"], "argument --log-interval: expected an integer >= 1"),
    (["generate", "m.bin", "-z", "t.bin", "-n", "-5"], "argument -n: expected an integer >= 0"),
])
def test_out_of_range_flags_exit_2(capsys, args, msg):
    r = bl(capsys, *args)
    assert r.returncode == 2 and msg in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_library_refuses_the_same_settings(data_dir, tmp_path):
    for bad, msg in [({"max_iters": -1}, "max_iters must be >= 0, got -1"),
                     ({"grad_accum": 0}, "grad_accum must be >= 1, got 0"),
                     ({"batch_size": 0}, "batch_size must be >= 1, got 0"),
                     ({"dropout": 1.0}, r"dropout must be in \[0, 1\)"),
                     ({"learning_rate": float("nan")}, "learning_rate must be >= 0.0, got nan")]:
        with pytest.raises(T.TrainingError, match=msg):
            train(_cfg(data_dir, tmp_path, **bad))
    assert not (tmp_path / "ckpt.pt").exists()


@pytest.mark.parametrize("content", [b"", b"this is not a checkpoint\n" * 10,
                                     b"PK\x03\x04" + bytes(100)])
def test_resume_from_an_empty_or_junk_checkpoint(capsys, tmp_path, content):
    (tmp_path / "ckpt.pt").write_bytes(content)
    r = bl(capsys, "train", "--out", tmp_path, "--resume")
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert f"{tmp_path / 'ckpt.pt'}: cannot load" in r.stderr, r.stderr


def _tensor_entries(path):
    """(name, offset of its data in the file, size) of each tensor record in torch's zip."""
    with zipfile.ZipFile(path) as z, open(path, "rb") as f:
        for info in z.infolist():
            if "/data/" in info.filename and info.file_size >= 64:
                f.seek(info.header_offset + 26)
                name_len, extra_len = struct.unpack("<HH", f.read(4))
                yield info.filename, info.header_offset + 30 + name_len + extra_len, \
                    info.file_size


def test_a_flipped_byte_in_any_tensor_is_detected(ckpt, tmp_path):
    data = ckpt.read_bytes()
    entries = list(_tensor_entries(ckpt))
    assert len(entries) > 20   # model weights, AdamW's moments
    for i, (_name, offset, size) in enumerate(entries[::8]):
        bad = bytearray(data)
        bad[offset + size // 2] ^= 0x10   # one bit of one float
        path = tmp_path / f"flip{i}.pt"
        path.write_bytes(bad)
        torch.load(path, weights_only=True)   # torch itself notices nothing
        with pytest.raises(CheckpointError, match=f"{path}: corrupt checkpoint"):
            read_checkpoint(path)
        with pytest.raises(CheckpointError, match="corrupt checkpoint"):
            Transformer.from_pretrained(path)
    read_checkpoint(ckpt)   # the intact file still loads


def test_corrupt_checkpoint_through_the_cli(capsys, ckpt, tmp_path):
    _name, offset, size = max(_tensor_entries(ckpt), key=lambda e: e[2])
    bad = bytearray(ckpt.read_bytes())
    bad[offset + 7] ^= 0x01
    (tmp_path / "ckpt.pt").write_bytes(bad)
    for r in (bl(capsys, "train", "--out", tmp_path, "--resume"),
              bl(capsys, "export", tmp_path / "ckpt.pt", tmp_path / "m.bin")):
        assert r.returncode == 1 and "Traceback" not in r.stderr
        assert f"{tmp_path / 'ckpt.pt'}: corrupt checkpoint" in r.stderr, r.stderr
    assert not (tmp_path / "m.bin").exists()


@pytest.mark.parametrize("failure", [OSError(errno.ENOSPC, "No space left on device"),
                                     KeyboardInterrupt()])
def test_a_failed_checkpoint_write_leaves_no_temporary(data_dir, tmp_path, monkeypatch, failure):
    """Disk full (or Ctrl-C) halfway through torch.save: the previous ckpt.pt stays intact and
    ckpt.pt.tmp is removed."""
    train(_cfg(data_dir, tmp_path))
    before = (tmp_path / "ckpt.pt").read_bytes()
    real_save = torch.save

    def full_disk(obj, f, *a, **kw):
        real_save(obj, f, *a, **kw)   # most of the bytes reach the file, then the disk fills
        f.truncate(f.tell() // 2)
        raise failure

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(type(failure)) as e:
        train(_cfg(data_dir, tmp_path, max_iters=4), resume=True)
    if isinstance(failure, OSError):
        assert e.value.errno == errno.ENOSPC and e.value.filename == str(tmp_path / "ckpt.pt")
        assert "cannot write checkpoint" in str(e.value)
    assert sorted(p.name for p in tmp_path.iterdir() if "ckpt" in p.name) == ["ckpt.pt"]
    assert (tmp_path / "ckpt.pt").read_bytes() == before
    assert read_checkpoint(tmp_path / "ckpt.pt")["iter_num"] == 2
