"""The tiling ledger survives a power loss: a tile's data reach the disk (fsync) before its flag, and
the flags are fsync'ed in group commits."""
import os

import numpy as np
import pytest

from _tiling_util import integer_weights_
from medconv_ext import tile as tile_cli
from medconv_ext.models.valid_srnet import valid_srnet
from medconv_ext.tiling import io as tio
from medconv_ext.tiling import save_tiling_checkpoint


def _setup(tmp_path):
    net = integer_weights_(valid_srnet(features=2, blocks=1).double().eval())
    save_tiling_checkpoint(net, tmp_path / "net.pt")
    np.save(tmp_path / "in.npy", np.random.default_rng(0).random((1, 40, 40)) + 1.0)


def _record(monkeypatch):
    """Every os.fsync (the path of its descriptor) and os.pwrite (offset), in order."""
    events = []
    real_fsync, real_pwrite = os.fsync, os.pwrite

    def fsync(fd):
        events.append(("fsync", os.path.realpath(os.readlink("/proc/self/fd/%d" % fd))))
        return real_fsync(fd)

    def pwrite(fd, data, offset):
        events.append(("pwrite", os.path.realpath(os.readlink("/proc/self/fd/%d" % fd)), offset))
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "pwrite", pwrite)
    return events


def _run(tmp_path, out, *extra):
    return tile_cli.main(["--model", str(tmp_path / "net.pt"), "--input", str(tmp_path / "in.npy"), "--output",
                          str(out), "--tile", "16", "--batch-size", "2", "--no-progress", "--verify", "0"] + list(extra))


def _commits(events, flags):
    """[(data paths fsync'ed before the group's flags, tile ids flagged)] per group commit; checks that
    each group's flags are fsync'ed before any later data."""
    groups, data, ids = [], [], []
    for ev in events:
        if ev[0] == "pwrite":
            assert ev[1] == flags
            ids.append(ev[2])
        elif ev[1] == flags:
            if ids:
                groups.append((data, ids))
            data, ids = [], []
        else:
            assert not ids, "data fsync'ed between a group's flags and their fsync"
            data.append(ev[1])
    assert not ids, "flags written but never fsync'ed"
    return groups


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc/self/fd")
def test_npy_data_reach_the_disk_before_their_flags(tmp_path, monkeypatch):
    _setup(tmp_path)
    out = tmp_path / "out.npy"
    events = _record(monkeypatch)
    assert _run(tmp_path, out, "--sync-every", "0") == 0  # a group commit after every batch
    flags = os.path.realpath(tio.Ledger(out).flags_path)
    groups = _commits(events, flags)
    n = tio.Ledger(out).done().size
    assert sorted(i for _, ids in groups for i in ids) == list(range(n))
    assert len(groups) == -(-n // 2)  # batches of 2
    for data, ids in groups:
        assert os.path.realpath(out) in data, (data, ids)


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc/self/fd")
def test_group_commits_are_batched(tmp_path, monkeypatch):
    _setup(tmp_path)
    out = tmp_path / "out.npy"
    events = _record(monkeypatch)
    assert _run(tmp_path, out, "--sync-every", "3600") == 0  # one commit, at the end
    groups = _commits(events, os.path.realpath(tio.Ledger(out).flags_path))
    assert len(groups) == 1 and os.path.realpath(out) in groups[0][0]
    assert len(groups[0][1]) == tio.Ledger(out).done().size


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc/self/fd")
def test_zarr_chunk_files_reach_the_disk_before_their_flags(tmp_path, monkeypatch):
    # without syncfs (not Linux): every chunk file written since the last commit is fsync'ed
    pytest.importorskip("zarr")
    _setup(tmp_path)
    out = tmp_path / "out.zarr"
    monkeypatch.setattr(tio, "_SYNCFS", None)
    events = _record(monkeypatch)
    assert _run(tmp_path, out, "--sync-every", "0") == 0
    groups = _commits(events, os.path.realpath(tio.Ledger(out).flags_path))
    root = os.path.realpath(out)
    chunks = {os.path.realpath(os.path.join(d, f)) for d, _, fs in os.walk(out) for f in fs if f != "zarr.json"}
    assert chunks
    synced = set()
    for data, ids in groups:
        new = {p for p in data if p in chunks} - synced
        assert len(new) >= len(ids), (ids, data)  # one chunk per tile output region, each written before its flag
        synced |= new
    assert synced == chunks and all(p.startswith(root) for p in synced)


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc/self/fd")
def test_zarr_syncfs_before_every_group_of_flags(tmp_path, monkeypatch):
    pytest.importorskip("zarr")
    if tio._SYNCFS is None:
        pytest.skip("no syncfs on this system")
    _setup(tmp_path)
    out = tmp_path / "out.zarr"
    events = _record(monkeypatch)
    real = tio._SYNCFS

    def syncfs(fd):
        events.append(("fsync", "syncfs:" + os.path.realpath(os.readlink("/proc/self/fd/%d" % fd))))
        return real(fd)

    monkeypatch.setattr(tio, "_SYNCFS", syncfs)
    assert _run(tmp_path, out, "--sync-every", "0") == 0
    groups = _commits(events, os.path.realpath(tio.Ledger(out).flags_path))
    assert len(groups) == -(-tio.Ledger(out).done().size // 2)
    for data, ids in groups:
        assert "syncfs:" + os.path.realpath(out) in data, (data, ids)


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc/self/fd")
def test_no_sync_skips_the_fsyncs(tmp_path, monkeypatch):
    _setup(tmp_path)
    out = tmp_path / "out.npy"
    events = _record(monkeypatch)
    assert _run(tmp_path, out, "--no-sync", "--sync-every", "0") == 0
    flags = os.path.realpath(tio.Ledger(out).flags_path)
    first = next(k for k, e in enumerate(events) if e[0] == "pwrite")  # (creating the ledger fsyncs it once)
    assert [e for e in events[first:] if e[0] == "fsync" and e[1] in (flags, os.path.realpath(out))] == []
    assert tio.Ledger(out).done().all()


def test_sync_every_must_be_a_number_of_seconds(tmp_path, capsys):
    _setup(tmp_path)
    assert _run(tmp_path, tmp_path / "o.npy", "--sync-every", "-1") == 2
    assert "--sync-every" in capsys.readouterr().err and not os.path.exists(tmp_path / "o.npy")
