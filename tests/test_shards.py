import h5py
import numpy as np
import pandas as pd
import pytest

from diffseg.shards import gather, shard_indices


def _write_shard(path, ids, offset):
    with h5py.File(path, "w") as f:
        f.attrs["threshold"] = 0.5
        f.create_dataset("ids", data=np.array(ids, dtype=object), dtype=h5py.string_dtype())
        f.create_dataset("timesteps", data=np.array([60, 70], dtype=np.int32))
        f.create_dataset("maps", data=np.arange(len(ids) * 2 * 4, dtype=np.float16).reshape(len(ids), 2, 2, 2) + offset)


def test_shard_indices_cover_every_item_once_in_order():
    blocks = [shard_indices(10, k, 4) for k in range(4)]
    assert [b.tolist() for b in blocks] == [[0, 1, 2], [3, 4, 5], [6, 7], [8, 9]]
    assert shard_indices(10, 0, 1).tolist() == list(range(10))
    with pytest.raises(ValueError, match="shard 4 is outside 0..3"):
        shard_indices(10, 4, 4)


def test_gather_concatenates_per_image_data_and_copies_shared(tmp_path):
    # Two images per shard and two timesteps: the shared dataset has as many rows as a shard has
    # ids, so only the explicit list of shared datasets can tell them apart.
    parts = []
    for k, ids in enumerate([["a", "b"], ["c", "d"], []]):
        parts.append(str(tmp_path / f"s{k}.h5"))
        _write_shard(parts[-1], ids, offset=100 * k)
    out = tmp_path / "all.h5"
    gather(parts, [str(out)])
    with h5py.File(out) as f:
        assert [x.decode() for x in f["ids"][...]] == ["a", "b", "c", "d"]
        assert f["timesteps"][...].tolist() == [60, 70]
        assert f["maps"].shape == (4, 2, 2, 2)
        assert f["maps"][2, 0, 0, 0] == 100
        assert f.attrs["threshold"] == 0.5


def test_gather_refuses_shards_that_disagree(tmp_path):
    a, b = tmp_path / "a.h5", tmp_path / "b.h5"
    _write_shard(a, ["x"], 0)
    _write_shard(b, ["y"], 0)
    with h5py.File(b, "r+") as f:
        f["timesteps"][0] = 61
    with pytest.raises(ValueError, match="timesteps' differs between shards"):
        gather([str(a), str(b)], [str(tmp_path / "out.h5")])
    assert not (tmp_path / "out.h5").exists()


def test_gather_csv_by_extension(tmp_path):
    pd.DataFrame({"id": ["a"], "ged": [0.1]}).to_csv(tmp_path / "0.csv", index=False)
    pd.DataFrame({"id": ["b"], "ged": [0.2]}).to_csv(tmp_path / "1.csv", index=False)
    gather([str(tmp_path / "0.csv"), str(tmp_path / "1.csv")], [str(tmp_path / "all.csv")])
    assert pd.read_csv(tmp_path / "all.csv").to_dict("list") == {"id": ["a", "b"], "ged": [0.1, 0.2]}


def test_shard_boundaries_fall_on_whole_blocks():
    blocks = [shard_indices(10, k, 2, block=4).tolist() for k in range(2)]
    assert blocks == [[0, 1, 2, 3, 4, 5, 6, 7], [8, 9]]
    assert shard_indices(3, 2, 4, block=4).tolist() == []
    assert sorted(sum((shard_indices(23, k, 5, block=3).tolist() for k in range(5)), [])) == list(range(23))
