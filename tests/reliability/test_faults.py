"""Faults at scale, in-process: a disk that fills up mid-write, a GPU that runs out of memory.

The workflow-level faults (a failed cluster job, a second run on the same folder) are in
test_cluster_faults.py.
"""

from __future__ import annotations

import errno
import io
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from diffseg.atomic import DiskFullError, atomic_path
from diffseg.ddpm import PairSampler
from diffseg.shards import gather_h5
from diffseg.train import load_checkpoint
from diffseg.unet import ConditionalUNet, SegUNet
from test_baselines import tiny as tiny_baseline
from test_baselines import write_dataset as write_baseline_dataset
from test_inference import StandIn, dataset, fake_ddpm, read_all, run  # noqa: F401 (fixtures)
from test_train import make_trainer, synthetic_pairs

# ----------------------------------------------------------------------------- a full disk


class FillingDisk(io.FileIO):
    """A file on a disk with ``free`` bytes left: a write past them raises ENOSPC, as the OS does."""

    def __init__(self, path, free: int):
        super().__init__(path, "w+b")
        self.free = free

    def write(self, data) -> int:
        if len(data) > self.free:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.free -= len(data)
        return super().write(data)


class DiskFillsUp:
    """HDF5 writes succeed until ``writes`` of them are done, then raise what h5py raises on a full disk.

    (HDF5's file-object driver cannot stand in: a write error inside it crashes the interpreter.
    test_a_real_full_disk_... below fills a real tmpfs where user namespaces allow one.)
    """

    def __init__(self, monkeypatch, writes: int | None):
        self.left, self.done = writes, 0  # writes None: never full, only count
        for cls, name in ((h5py.Group, "create_dataset"), (h5py.Dataset, "__setitem__")):
            monkeypatch.setattr(cls, name, self.counted(getattr(cls, name)))

    def counted(self, write):
        def once_more(*args, **kwargs):
            if self.left is not None:
                if self.left == 0:
                    raise OSError(errno.ENOSPC, "Can't synchronously write data (file write failed: errno = 28, "
                                                "error message = 'No space left on device')")
                self.left -= 1
            self.done += 1
            return write(*args, **kwargs)

        return once_more


def write_shards(folder: Path, n_shards: int = 2, per_shard: int = 4) -> list[Path]:
    """Two shard files of ids, timesteps and random maps."""
    rng = np.random.default_rng(0)
    parts = []
    for k in range(n_shards):
        path = folder / f"shard-{k}-of-{n_shards}.h5"
        with h5py.File(path, "w") as fh:
            ids = [f"ISIC_{k}_{i}" for i in range(per_shard)]
            fh.create_dataset("ids", data=np.asarray(ids, dtype=object), dtype=h5py.string_dtype("utf-8"))
            fh.create_dataset("timesteps", data=np.arange(3, dtype=np.int32))
            fh.create_dataset("maps", data=rng.random((per_shard, 3, 32, 32), dtype=np.float32))
        parts.append(path)
    return parts


def test_atomic_path_names_the_final_file_when_the_disk_fills(tmp_path):
    final = tmp_path / "out" / "table.csv"
    with pytest.raises(DiskFullError, match=rf"^\[Errno 28\] {re.escape(str(final))}: disk full .*rerun") as caught:
        with atomic_path(final) as tmp, FillingDisk(tmp, free=10) as fh:
            fh.write(b"12345")
            fh.write(b"67890abcdef")  # the disk fills up here
    assert caught.value.errno == errno.ENOSPC and isinstance(caught.value, OSError)
    assert list(final.parent.iterdir()) == []  # neither the final name nor the temporary file


def test_full_disk_while_gathering_an_hdf5_file_names_it_and_the_rerun_completes(tmp_path, monkeypatch):
    parts = write_shards(tmp_path)
    out = tmp_path / "gathered" / "test.h5"
    with monkeypatch.context() as patch:
        disk = DiskFillsUp(patch, writes=2)  # ids and timesteps are written, the maps fill the disk
        with pytest.raises(DiskFullError, match=rf"{re.escape(str(out))}: disk full"):
            gather_h5(parts, out)
    assert disk.done == 2 and list(out.parent.iterdir()) == []

    gather_h5(parts, out)  # space freed: the rerun completes
    with h5py.File(out) as fh, h5py.File(parts[0]) as first, h5py.File(parts[1]) as second:
        np.testing.assert_array_equal(fh["maps"][()], np.concatenate([first["maps"][()], second["maps"][()]]))


def test_full_disk_during_inference_names_the_output_and_the_rerun_completes(fake_ddpm, dataset, tmp_path,
                                                                             monkeypatch):
    path, _ = dataset
    out, clean = tmp_path / "inference" / "test.h5", tmp_path / "clean.h5"
    with monkeypatch.context() as patch:
        counter = DiskFillsUp(patch, writes=None)
        run(path, fake_ddpm, clean, batch_images=2)
    assert counter.done >= 6  # the datasets, then the rows of 4 batches
    with monkeypatch.context() as patch:
        disk = DiskFillsUp(patch, writes=counter.done // 2)  # full half-way through
        with pytest.raises(DiskFullError, match=rf"{re.escape(str(out))}: disk full"):
            run(path, fake_ddpm, out, batch_images=2)
    assert disk.done == counter.done // 2 and list(out.parent.iterdir()) == []
    run(path, fake_ddpm, out, batch_images=2)
    got, want = read_all(out), read_all(clean)
    for key in want[0]:
        np.testing.assert_array_equal(got[0][key], want[0][key])


REAL_FULL_DISK = """
import json, sys
from pathlib import Path
import h5py, numpy as np, torch
from diffseg.atomic import atomic_path
from diffseg.train import save_checkpoint

disk = Path(sys.argv[1])
filler = disk / "filler"
filler.write_bytes(b"x" * (900 * 1024))  # of 1 MiB
big = np.random.default_rng(0).random(40_000)  # 320 KB


def write_h5():
    with atomic_path(disk / "maps.h5") as tmp, h5py.File(tmp, "w") as fh:
        fh["maps"] = big


def write_checkpoint():
    keys = ("model", "ema", "optimizer", "scaler", "step", "config", "version", "kind", "best_metric")
    save_checkpoint(disk / "model.pt", {**dict.fromkeys(keys), "model": {"w": torch.from_numpy(big)}})


report = {}
for name, write in [("maps.h5", write_h5), ("model.pt", write_checkpoint)]:
    try:
        write()
        report[name] = {"error": None}
    except Exception as err:
        report[name] = {"error": f"{type(err).__name__}: {err}", "left": sorted(p.name for p in disk.iterdir())}
filler.unlink()  # space freed: the rerun completes
write_h5(), write_checkpoint()
report["after freeing"] = sorted(p.name for p in disk.iterdir())
print(json.dumps(report))
"""


def user_namespaces_work() -> bool:
    if shutil.which("unshare") is None:
        return False
    return subprocess.run(["unshare", "-Urm", "true"], capture_output=True).returncode == 0


@pytest.mark.skipif(not user_namespaces_work(), reason="needs `unshare -Urm` to mount a small tmpfs")
def test_a_real_full_disk_names_the_file_for_hdf5_and_checkpoints(tmp_path):
    disk = tmp_path / "disk"
    disk.mkdir()
    script = tmp_path / "fill.py"
    script.write_text(REAL_FULL_DISK)
    cmd = f'mount -t tmpfs -o size=1m tmpfs "{disk}" && exec "{sys.executable}" "{script}" "{disk}"'
    proc = subprocess.run(["unshare", "-Urm", "sh", "-c", cmd], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.splitlines()[-1])
    for name in ("maps.h5", "model.pt"):
        assert report[name]["error"] is not None, name
        assert report[name]["error"].startswith(f"DiskFullError: [Errno 28] {disk / name}: disk full"), report[name]
        assert report[name]["left"] == ["filler"], report[name]  # nothing under the final name, no temporary
    assert report["after freeing"] == ["maps.h5", "model.pt"]


# ----------------------------------------------------------------------------- GPU out of memory


def out_of_memory_above(monkeypatch, network: type[torch.nn.Module], max_batch: int, active=lambda: True) -> None:
    """``network`` raises CUDA's out-of-memory error on a batch of more than ``max_batch`` (while ``active()``)."""
    forward = network.forward

    def limited(self, x, *args, **kwargs):
        if active() and x.shape[0] > max_batch:
            raise torch.OutOfMemoryError(f"CUDA out of memory. Tried to allocate {x.shape[0]} x 1.00 GiB")
        return forward(self, x, *args, **kwargs)

    monkeypatch.setattr(network, "forward", limited)


def test_out_of_memory_in_inference_names_batch_images_and_the_lowered_rerun_completes(fake_ddpm, dataset, tmp_path,
                                                                                      monkeypatch):
    path, _ = dataset
    out = tmp_path / "inference" / "test.h5"
    clean = tmp_path / "clean.h5"
    run(path, fake_ddpm, clean, batch_images=1)
    out_of_memory_above(monkeypatch, StandIn, max_batch=6)  # 3 timesteps x 2 labels: one image per call fits
    with pytest.raises(torch.OutOfMemoryError, match=r"in inference \(6 network passes per image in one call\) "
                                                     r"with inference\.batch_images = 2: lower inference\.batch_images"):
        run(path, fake_ddpm, out, batch_images=2)
    assert list(out.parent.iterdir()) == []
    run(path, fake_ddpm, out, batch_images=1)
    got, want = read_all(out), read_all(clean)
    for key in want[0]:
        np.testing.assert_array_equal(got[0][key], want[0][key])


def test_out_of_memory_in_training_names_batch_size_and_keeps_the_resume_checkpoint(tmp_path, monkeypatch):
    trainer = make_trainer(tmp_path, 8, name="oom")  # batch 8, resume checkpoint every 4 steps
    # Another process takes GPU memory after step 5: from then on only 4 images fit.
    out_of_memory_above(monkeypatch, ConditionalUNet, max_batch=4, active=lambda: trainer.step >= 5)
    with pytest.raises(torch.OutOfMemoryError, match=r"at training step 6 with train\.batch_size = 8: lower "
                                                     r"train\.batch_size and rerun; .*model\.pt\.resume\.pt \(step 4\)"):
        trainer.fit()
    assert load_checkpoint(tmp_path / "oom" / "model.pt.resume.pt")["step"] == 4
    assert not (tmp_path / "oom" / "model.pt").exists()

    images, healthy, _ = synthetic_pairs(8)
    smaller = PairSampler(images, healthy, 4, trainer.sample_batch.augment, 0.0, trainer.model.null_label)
    summary = make_trainer(tmp_path, 8, name="oom", sample_batch=smaller).fit()  # train.batch_size lowered to 4
    assert summary["resumed_from"] == 4 and summary["steps"] == 8


def test_out_of_memory_in_baseline_training_names_baselines_batch_size(tmp_path, monkeypatch):
    from diffseg.baselines import train_baseline

    dataset_h5 = write_baseline_dataset(tmp_path / "dataset.h5")
    out_of_memory_above(monkeypatch, SegUNet, max_batch=4)
    with pytest.raises(torch.OutOfMemoryError, match=r"at training step 1 with baselines\.batch_size = 8: lower "
                                                     r"baselines\.batch_size.*no resume checkpoint was written yet"):
        train_baseline("unet", dataset_h5, tmp_path / "unet.pt", tmp_path / "unet.csv", tiny_baseline(steps=4),
                       augment={})
    assert not (tmp_path / "unet.pt").exists()
