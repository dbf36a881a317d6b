"""Interruptions and damaged files: a killed rule resumes or leaves nothing half-written behind."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from workflow_helpers import snakemake, workflow_copy

TRAIN_STEPS = 60
CHECKPOINT_EVERY = 10


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, f"process ended before {path} appeared"
        assert time.monotonic() < deadline, f"{path} did not appear in {timeout} s"
        time.sleep(0.02)


@pytest.fixture(scope="module")
def killed_and_resumed_training(tmp_path_factory):
    """Start train_ddpm, SIGKILL the whole job at its first resume checkpoint, then rerun."""
    wf = workflow_copy(tmp_path_factory.mktemp("kill"), {
        "train": {"steps": TRAIN_STEPS, "batch_size": 4, "warmup_steps": 2,
                  "checkpoint_every": CHECKPOINT_EVERY, "log_every": 10}})
    target = "results/models/ddpm.pt"
    resume = wf / "results/models/ddpm.pt.resume.pt"
    proc = subprocess.Popen([sys.executable, "-m", "snakemake", "--cores", "2", target, "--configfile", "test.yaml"],
                            cwd=wf, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    _wait_for(resume, proc)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = torch.load(resume, map_location="cpu", weights_only=False)["step"]
    assert not (wf / target).exists()
    snakemake(wf, "--unlock")  # a killed Snakemake leaves its lock behind
    rerun = snakemake(wf, target)
    return wf, killed_at, rerun


def test_killed_training_resumes_from_its_last_checkpoint(killed_and_resumed_training):
    wf, killed_at, rerun = killed_and_resumed_training
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert 0 < killed_at < TRAIN_STEPS and killed_at % CHECKPOINT_EVERY == 0
    log = (wf / "results/logs/train_ddpm.log").read_text()
    # Resumed at the checkpoint the kill left: at most one checkpoint interval of work was lost.
    assert f"at step {killed_at} of {TRAIN_STEPS}" in log
    final = torch.load(wf / "results/models/ddpm.pt", map_location="cpu", weights_only=False)
    assert final["step"] == TRAIN_STEPS
    assert not (wf / "results/models/ddpm.pt.resume.pt").exists()


SLOW_INFERENCE = """
import sys, time
import diffseg.inference as inference
from diffseg.settings import InferenceSettings
original = inference.noise_difference
def slow(*args, **kwargs):
    time.sleep(0.3)
    return original(*args, **kwargs)
inference.noise_difference = slow
settings = InferenceSettings(timesteps=[60, 100, 150], batch_images=1, device="cpu")
inference.run_inference(sys.argv[1], sys.argv[2], sys.argv[3], settings, split="train")
"""


def test_inference_killed_mid_write_leaves_no_file_that_looks_complete(killed_and_resumed_training, tmp_path):
    wf, _, _ = killed_and_resumed_training
    dataset, checkpoint = wf / "results/data/dataset.h5", wf / "results/models/ddpm.pt"
    out = tmp_path / "inference.h5"
    proc = subprocess.Popen([sys.executable, "-c", SLOW_INFERENCE, str(dataset), str(checkpoint), str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 120
    while not any(p.name.startswith(f".{out.name}.tmp") for p in tmp_path.iterdir()):
        assert proc.poll() is None and time.monotonic() < deadline, "inference ended before writing"
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not out.exists(), "a killed inference left a file under its final name"

    from diffseg.inference import run_inference
    from diffseg.settings import InferenceSettings

    run_inference(dataset, checkpoint, out, InferenceSettings(timesteps=[60, 100, 150], batch_images=1, device="cpu"),
                  split="train")
    assert out.exists()


def test_damaged_checkpoint_and_dataset_are_named(killed_and_resumed_training, tmp_path):
    from diffseg.imageio import InputError
    from diffseg.inference import run_inference
    from diffseg.settings import InferenceSettings

    cpu = InferenceSettings(device="cpu")
    wf, _, _ = killed_and_resumed_training
    dataset, checkpoint = wf / "results/data/dataset.h5", wf / "results/models/ddpm.pt"
    broken_ckpt = tmp_path / "ddpm.pt"
    broken_ckpt.write_bytes(checkpoint.read_bytes()[:1000])
    with pytest.raises(InputError, match=str(broken_ckpt)):
        run_inference(dataset, broken_ckpt, tmp_path / "a.h5", cpu, split="train")
    broken_h5 = tmp_path / "dataset.h5"
    broken_h5.write_bytes(dataset.read_bytes()[:2000])
    with pytest.raises(InputError, match=str(broken_h5)):
        run_inference(broken_h5, checkpoint, tmp_path / "b.h5", cpu, split="train")
    assert not (tmp_path / "a.h5").exists() and not (tmp_path / "b.h5").exists()
