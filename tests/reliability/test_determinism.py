"""Same seed, same results: bit-identical masks and metrics, whatever the shard count or executor."""

import h5py
import numpy as np
import pytest

from workflow_helpers import REPO, snakemake, workflow_copy

COMPARED = {
    "inference/test.h5": ["ids", "timesteps", "maps", "binary"],
    "uncertainty/test.h5": ["ids", "consistency", "ambiguity", "ged"],
    "crf/test.h5": ["ids", "fused", "rounds"],
}


@pytest.mark.slow
def test_second_run_with_six_shards_through_a_cluster_executor_is_bit_identical(tiny_run, tmp_path):
    # Run 2: same seed, 6 shards, every job submitted through the cluster-generic executor
    # (a local stand-in for sbatch), as on a SLURM cluster. CPU float results depend on the thread
    # count, so the torch rules get the 2 threads the local run gave them (on a cluster: set-threads).
    wf = workflow_copy(tmp_path / "cluster", {"shards": 6})  # 4 test images: 2 shards are empty
    run = snakemake(wf, "--executor", "cluster-generic", "--jobs", "4",
                    "--cluster-generic-submit-cmd", str(REPO / "tests" / "fake_sbatch.sh"),
                    "--set-threads", "train_ddpm=2", "train_baseline=2", "--seconds-between-status-checks", "1")
    assert run.returncode == 0, run.stderr[-5000:]
    assert (wf / "results/inference/test/shard-5-of-6.h5").exists()
    for name, keys in COMPARED.items():
        with h5py.File(tiny_run / "results" / name) as one, h5py.File(wf / "results" / name) as four:
            for key in keys:
                np.testing.assert_array_equal(one[key][...], four[key][...], err_msg=f"{name}:{key}")
    for name in ["metrics/test.csv", "metrics/table.md", "uncertainty/test.csv"]:
        assert (tiny_run / "results" / name).read_text() == (wf / "results" / name).read_text(), name
    pngs = sorted(p.name for p in (tiny_run / "results/crf/test_png").iterdir())
    assert pngs and pngs == sorted(p.name for p in (wf / "results/crf/test_png").iterdir())
    for png in pngs:
        assert (tiny_run / "results/crf/test_png" / png).read_bytes() == (wf / "results/crf/test_png" / png).read_bytes()
