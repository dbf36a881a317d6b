"""Same seed, same results: bit-identical masks and metrics, whatever the shard count or executor."""

import h5py
import numpy as np
import pytest

COMPARED = {
    "inference/test.h5": ["ids", "timesteps", "maps", "binary"],
    "uncertainty/test.h5": ["ids", "consistency", "ambiguity", "ged"],
    "crf/test.h5": ["ids", "fused", "rounds"],
}


@pytest.mark.slow
def test_second_run_with_six_shards_through_a_cluster_executor_is_bit_identical(tiny_run, cluster_run):
    # Run 2 (tests/reliability/conftest.py): same seed, 6 shards, every job submitted through the
    # cluster-generic executor (a local stand-in for sbatch), as on a SLURM cluster; one job failed on
    # its node and was rerun, another was resubmitted.
    wf = cluster_run.wf
    assert cluster_run.rerun.returncode == 0, cluster_run.rerun.stderr[-5000:]
    assert (wf / "results/inference/test/shard-5-of-6.h5").exists()
    for name, keys in COMPARED.items():
        with h5py.File(tiny_run / "results" / name) as one, h5py.File(wf / "results" / name) as four:
            for key in keys:
                np.testing.assert_array_equal(one[key][...], four[key][...], err_msg=f"{name}:{key}")
    for name in ["metrics/test.csv", "metrics/table.md", "metrics/review_queue.csv", "uncertainty/test.csv"]:
        assert (tiny_run / "results" / name).read_text() == (wf / "results" / name).read_text(), name
    pngs = sorted(p.name for p in (tiny_run / "results/crf/test_png").iterdir())
    assert pngs and pngs == sorted(p.name for p in (wf / "results/crf/test_png").iterdir())
    for png in pngs:
        assert (tiny_run / "results/crf/test_png" / png).read_bytes() == (wf / "results/crf/test_png" / png).read_bytes()
