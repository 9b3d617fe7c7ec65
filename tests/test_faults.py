"""Read faults mid-run, a ledger that cannot be written, and resuming: nothing measured is lost.

Faults are injected through the reader's fault hook (called before every read attempt with the file,
offset, length and attempt number): it raises EIO, or returns a shorter length to simulate a short read.
The expected tokens come from an uninterrupted run of the same checkpoint (the session's, conftest.synth_run).
"""

from __future__ import annotations

import errno
import json
import os
import shutil

import pytest

from mlx_k2.errors import K2Error
from mlx_k2.evidence.ledger import LedgerWriteError, LedgerWriter
from mlx_k2.evidence.verify import verify
from mlx_k2.run.session import resume, run
from mlx_k2.read.storage import ReadError, ReadPolicy

from conftest import SYNTH_RUN_STEPS, cpu_spec

FAST = ReadPolicy(retries=2, backoff_s=0.001)
STEPS = SYNTH_RUN_STEPS


def lines(path):
    ledger = path / "ledger.jsonl" if path.is_dir() else path
    return [json.loads(line) for line in ledger.read_text().splitlines()]


@pytest.fixture(scope="module")
def uninterrupted(synth_run):
    """(tokens, ledger records) of the session's run: STEPS steps from BOS on the CPU."""
    recs = lines(synth_run[1])
    return [r["token_id"] for r in recs if r["kind"] == "step"], recs


class FailAfter:
    """EIO on every read of one shard once `after` reads of the run have gone through."""

    def __init__(self, after: int, shard: str = "model-00031-of-000064.safetensors", transient: bool = False):
        self.after, self.shard, self.transient, self.reads, self.failed = after, shard, transient, 0, 0

    def __call__(self, path, offset, length, attempt):
        self.reads += 1
        if self.reads > self.after and path.name == self.shard and (not self.transient or attempt == 0):
            self.failed += 1
            raise OSError(errno.EIO, "Input/output error")
        return None


@pytest.mark.parametrize("bundle", [False, True], ids=["ledger", "bundle"])
def test_eio_mid_step_then_resume(synth_dir, tmp_path, uninterrupted, bundle):
    expected_tokens, expected_lines = uninterrupted
    target = tmp_path / ("b" if bundle else "l.jsonl")
    kw = {"bundle_dir": target} if bundle else {"ledger_path": target}
    # Shard 31 holds layer 30. Step 0 makes about 3,700 reads here, step 1 about 6,200: after 5,000 reads
    # the fault hits layer 30 of step 1, with step 0 finished.
    fault = FailAfter(after=5000)
    with pytest.raises(ReadError) as info:
        run(synth_dir, [163584], STEPS, spec=cpu_spec(read=FAST), fault=fault, **kw)
    assert "model-00031-of-000064.safetensors" in str(info.value) and "layers.30." in str(info.value)
    assert "after 3 attempts" in str(info.value)
    recs = lines(target)
    footer = recs[-1]
    assert footer["kind"] == "footer" and footer["status"] == "failed" and "Input/output error" in footer["error"]
    finished = [r for r in recs if r["kind"] == "step"]
    assert 1 <= len(finished) < STEPS
    report = verify(target)
    assert report.ok, [(c.name, c.detail) for c in report.checks if c.ok is False]

    resumed = resume(target, device="cpu")
    assert resumed.status == "complete" and resumed.resumed_from == len(finished)
    recs = lines(target)
    assert [r["token_id"] for r in recs if r["kind"] == "step"] == expected_tokens
    # The resumed steps are the same computation: same digests and bytes as the uninterrupted run.
    for got, want in zip(recs[1:-1], expected_lines[1:-1]):
        for key in ("input_ids", "token_id", "hidden_digest", "logits_digest", "bytes_read"):
            assert got[key] == want[key], (got["step"], key)
    report = verify(target)
    assert report.ok and not report.partial, [(c.name, c.detail) for c in report.checks if c.ok is False]


@pytest.mark.parametrize("method", ["pread", "direct"])
def test_transient_fault_is_retried(synth_dir, tmp_path, uninterrupted, method):
    fault = FailAfter(after=300, transient=True)
    policy = ReadPolicy(method=method, retries=FAST.retries, backoff_s=FAST.backoff_s)
    result = run(synth_dir, [163584], STEPS, ledger_path=tmp_path / "l.jsonl", spec=cpu_spec(read=policy),
                 fault=fault)
    assert fault.failed > 0 and result.status == "complete"
    assert [s.token_id for s in result.steps] == uninterrupted[0]


@pytest.mark.parametrize("method", ["pread", "direct"])
def test_short_read_is_retried_then_reported(synth_dir, tmp_path, method):
    def short(path, offset, length, attempt):
        return length // 2 if path.name == "model-00005-of-000064.safetensors" else None

    policy = ReadPolicy(method=method, retries=FAST.retries, backoff_s=FAST.backoff_s)
    with pytest.raises(ReadError, match=r"model-00005-of-000064\.safetensors: tensor .*short read"):
        run(synth_dir, [163584], 1, ledger_path=tmp_path / "l.jsonl", spec=cpu_spec(read=policy), fault=short)
    assert lines(tmp_path / "l.jsonl")[-1]["status"] == "failed"


def test_vanished_shard_comes_back(synth_dir, tmp_path, uninterrupted):
    """A shard disappears (a dropped share) and returns while the reader is retrying (at step 0's layer 9)."""
    copy = tmp_path / "model"  # the checkpoint's files linked, not copied: the shard's name is what vanishes
    copy.mkdir()
    for f in synth_dir.iterdir():
        (copy / f.name).symlink_to(f)
    shard = copy / "model-00010-of-000064.safetensors"
    away = tmp_path / "away.safetensors"
    state = {"moved": False}

    def drop(path, offset, length, attempt):
        if path == shard and not state["moved"]:
            state["moved"] = True
            os.rename(shard, away)  # gone: the open descriptor still reads, so force a reopen
            raise OSError(errno.ESTALE, "Stale file handle")
        if path == shard and attempt == 1:
            os.rename(away, shard)
        return None

    result = run(copy, [163584], 1, ledger_path=tmp_path / "l.jsonl", spec=cpu_spec(read=FAST), fault=drop)
    assert state["moved"] and shard.exists()
    assert result.status == "complete" and [s.token_id for s in result.steps] == uninterrupted[0][:1]


def test_failed_write_keeps_a_valid_prefix(tmp_path, monkeypatch):
    path = tmp_path / "l.jsonl"
    writer = LedgerWriter(path)
    writer.write({"kind": "header", "n": 1})
    writer.write({"kind": "step", "step": 0, "x": 1})
    good = path.read_bytes()
    real = os.pwrite

    def half_then_enospc(fd, data, offset):
        real(fd, data[: len(data) // 2], offset)  # part of the line reaches the disk, then the disk is full
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "pwrite", half_then_enospc)
    with pytest.raises(LedgerWriteError, match="No space left on device"):
        writer.write({"kind": "step", "step": 1, "x": 2})
    monkeypatch.setattr(os, "pwrite", real)
    assert path.read_bytes() == good  # cut back to the last whole line: the chain is intact
    writer.close()


def test_unwritable_ledger_path_is_reported_before_the_run(synth_dir, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(K2Error, match="cannot write the ledger"):
        run(synth_dir, [163584], 1, ledger_path=blocker / "sub" / "l.jsonl", spec=cpu_spec())


def test_full_disk_is_reported_before_the_run(synth_dir, tmp_path, monkeypatch):
    import mlx_k2.run.session as session

    monkeypatch.setattr(session.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**9, 10**9 - 100, 100))
    with pytest.raises(K2Error, match="bytes free"):
        run(synth_dir, [163584], 2, ledger_path=tmp_path / "l.jsonl", spec=cpu_spec())
    assert not (tmp_path / "l.jsonl").exists()


def test_resume_refuses_another_checkpoint(synth_run, foreign_k25, tmp_path):
    path = tmp_path / "l.jsonl"
    shutil.copyfile(synth_run[1], path)  # a complete run
    text = path.read_text().splitlines()
    (tmp_path / "p.jsonl").write_text("\n".join(text[:2]) + "\n")  # header + step 0: a crashed run
    with pytest.raises(K2Error, match="recorded for a checkpoint"):
        resume(tmp_path / "p.jsonl", model_dir=foreign_k25, device="cpu")
    with pytest.raises(K2Error, match="complete; nothing to resume"):
        resume(path, device="cpu")


def test_resume_refuses_a_broken_chain(synth_run, tmp_path):
    text = synth_run[1].read_text().splitlines()  # a complete 3-step run
    text = [text[0], text[2]]  # step 0 deleted, no footer
    (tmp_path / "p.jsonl").write_text("\n".join(text) + "\n")
    with pytest.raises(K2Error, match="cannot resume: check chain fails"):
        resume(tmp_path / "p.jsonl", device="cpu")


@pytest.fixture(scope="module")
def foreign_k25(tmp_path_factory):
    from tests.foreign_checkpoint import write_foreign_checkpoint

    path = tmp_path_factory.mktemp("foreign") / "k25"
    write_foreign_checkpoint(path, "kimi_k25")
    return path
