"""Bad and odd inputs: each bad case names the file and the problem and leaves no output behind."""

import json
import logging
from pathlib import Path

import h5py
import numpy as np
import pytest
from PIL import Image

from diffseg.data import load_split, prepare_dataset
from diffseg.settings import PrepareSettings
from diffseg.imageio import InputError

RES = 32


def skin_with_lesion(height=40, width=48, seed=0):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:height, :width]
    mask = (yy - height / 2) ** 2 + (xx - width / 2) ** 2 <= (min(height, width) / 4) ** 2
    image = np.array([210.0, 160.0, 140.0]) + rng.normal(0, 5, (height, width, 3))
    image[mask] = [70, 50, 40]
    return np.clip(image, 0, 255).astype(np.uint8), mask


def save_mask(path: Path, mask: np.ndarray) -> None:
    Image.fromarray(mask.astype(np.uint8) * 255).save(path)


@pytest.fixture
def data(tmp_path):
    """Generic layout with three good pairs, IMG_0..IMG_2."""
    root = tmp_path / "data"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for i in range(3):
        image, mask = skin_with_lesion(seed=i)
        Image.fromarray(image).save(root / "images" / f"IMG_{i}.jpg")
        save_mask(root / "masks" / f"IMG_{i}_segmentation.png", mask)
    return root


def run(tmp_path, data_dir, **kw):
    """prepare_dataset into tmp_path/out; kw are PrepareSettings fields."""
    out = tmp_path / "out"
    kw = {"resolution": RES, "split_fractions": {"train": 1.0, "val": 0.0, "test": 0.0}, **kw}
    return out, prepare_dataset(data_dir, out / "dataset.h5", out / "split.csv", out / "preview.png",
                                PrepareSettings(**kw))


def assert_fails_cleanly(tmp_path, data_dir, file: Path, problem: str, **kw):
    with pytest.raises(InputError) as err:
        run(tmp_path, data_dir, **kw)
    assert str(err.value).startswith(str(file)), str(err.value)
    assert problem in str(err.value), str(err.value)
    out = tmp_path / "out"
    assert not out.exists() or list(out.iterdir()) == []  # no dataset.h5, no temp file


# ----------------------------------------------------------------------------- bad inputs


def test_truncated_jpeg(tmp_path, data):
    path = data / "images" / "IMG_1.jpg"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    assert_fails_cleanly(tmp_path, data, path, "unreadable or truncated image")


def test_image_without_mask(tmp_path, data):
    (data / "masks" / "IMG_2_segmentation.png").unlink()
    assert_fails_cleanly(tmp_path, data, data / "images" / "IMG_2.jpg", "image has no mask")


def test_mask_without_image(tmp_path, data):
    (data / "images" / "IMG_0.jpg").unlink()
    assert_fails_cleanly(tmp_path, data, data / "masks" / "IMG_0_segmentation.png", "mask has no image")


def test_mask_of_another_size(tmp_path, data):
    path = data / "masks" / "IMG_1_segmentation.png"
    save_mask(path, np.zeros((40, 50), bool))
    assert_fails_cleanly(tmp_path, data, path, "mask size 50x40 differs from image size 48x40")


@pytest.mark.parametrize("values", [(0, 128, 255), (0, 2)])
def test_mask_not_binary(tmp_path, data, values):
    path = data / "masks" / "IMG_1_segmentation.png"
    Image.fromarray(np.resize(np.array(values, np.uint8), (40, 48))).save(path)
    assert_fails_cleanly(tmp_path, data, path, "mask is not binary")


def test_empty_input_folder(tmp_path):
    root = tmp_path / "data"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    assert_fails_cleanly(tmp_path, root, root / "images", "no images found")


def test_missing_input_folder(tmp_path):
    assert_fails_cleanly(tmp_path, tmp_path / "nowhere", tmp_path / "nowhere", "data folder not found")


def test_skip_lists_the_bad_file_in_attrs_and_log(tmp_path, data, caplog):
    path = data / "masks" / "IMG_1_segmentation.png"
    Image.fromarray(np.full((40, 48), 7, np.uint8)).save(path)
    with caplog.at_level(logging.WARNING, logger="diffseg.data"):
        out, summary = run(tmp_path, data, on_bad_file="skip")
    assert summary["skipped"] == [[str(path), "mask is not binary: values 7 (expected 0/255 or 0/1)"]]
    with h5py.File(out / "dataset.h5", "r") as h5:
        assert json.loads(h5.attrs["skipped"]) == summary["skipped"]
    assert load_split(out / "dataset.h5", "train")["ids"] == ["IMG_0", "IMG_2"]
    assert any(str(path) in r.getMessage() and "not binary" in r.getMessage() for r in caplog.records)


def test_skip_with_nothing_valid_left_is_an_error(tmp_path, data):
    for i in range(3):
        Image.fromarray(np.full((40, 48), 7, np.uint8)).save(data / "masks" / f"IMG_{i}_segmentation.png")
    assert_fails_cleanly(tmp_path, data, data, "no valid image/mask pair left (3 skipped)", on_bad_file="skip")


# ----------------------------------------------------------------------------- odd but valid


def replace_pair(data: Path, image: Image.Image, mask: np.ndarray, name: str = "IMG_0.png") -> None:
    (data / "images" / "IMG_0.jpg").unlink()
    image.save(data / "images" / name)
    save_mask(data / "masks" / "IMG_0_segmentation.png", mask)


def first(out: Path) -> dict:
    train = load_split(out / "dataset.h5", "train")
    assert train["ids"][0] == "IMG_0"
    return {k: v[0] for k, v in train.items()}


def test_all_zero_mask_is_kept_with_the_image_as_twin(tmp_path, data):
    save_mask(data / "masks" / "IMG_0_segmentation.png", np.zeros((40, 48), bool))
    out, _ = run(tmp_path, data)
    pair = first(out)
    assert not pair["masks"].any() and pair["has_healthy"]
    np.testing.assert_array_equal(pair["healthy"], pair["images"])


def test_image_of_one_colour(tmp_path, data):
    _, mask = skin_with_lesion()
    replace_pair(data, Image.fromarray(np.full((40, 48, 3), (120, 90, 60), np.uint8)), mask)
    pair = first(run(tmp_path, data)[0])
    assert (pair["images"] == (120, 90, 60)).all() and (pair["healthy"] == (120, 90, 60)).all()


def test_16bit_png_is_scaled_to_8_bits(tmp_path, data):
    _, mask = skin_with_lesion()
    replace_pair(data, Image.fromarray(np.full((40, 48), 32896, np.uint16)), mask)  # 32896/65535*255 = 128
    pair = first(run(tmp_path, data)[0])
    assert (pair["images"] == 128).all()


@pytest.mark.parametrize("mode", ["L", "RGBA"])
def test_grayscale_and_rgba_become_rgb(tmp_path, data, mode):
    image, mask = skin_with_lesion()
    replace_pair(data, Image.fromarray(image).convert(mode), mask)
    pair = first(run(tmp_path, data)[0])
    assert pair["images"].shape == (RES, RES, 3)
    if mode == "L":
        assert (pair["images"][..., 0] == pair["images"][..., 2]).all()
    else:
        assert abs(int(pair["images"][0, 0, 0]) - 210) < 15  # skin colour, alpha dropped


def test_exif_rotated_jpeg_is_turned_upright(tmp_path, data):
    stored = np.zeros((40, 60, 3), np.uint8)
    stored[:, :30] = (255, 0, 0)  # left half red as stored; upright (rotated 90 deg clockwise) it is the top
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 CW to display
    (data / "images" / "IMG_0.jpg").unlink()
    Image.fromarray(stored).save(data / "images" / "IMG_0.jpg", exif=exif, quality=95)
    upright_mask = np.zeros((60, 40), bool)
    upright_mask[:30] = True
    save_mask(data / "masks" / "IMG_0_segmentation.png", upright_mask)
    pair = first(run(tmp_path, data)[0])
    assert tuple(pair["orig_size"]) == (60, 40)
    assert (pair["images"][:12, :, 0] > 200).all() and (pair["images"][20:, :, 0] < 40).all()


def test_very_large_image_is_resized(tmp_path, data):
    height, width = 4000, 6000
    image = np.empty((height, width, 3), np.uint8)
    image[:] = (200, 150, 130)
    mask = np.zeros((height, width), bool)
    mask[1000:3000, 1500:4500] = True  # a quarter of the area
    image[mask] = (60, 40, 30)
    (data / "images" / "IMG_0.jpg").unlink()
    Image.fromarray(image).save(data / "images" / "IMG_0.jpg", quality=90)
    save_mask(data / "masks" / "IMG_0_segmentation.png", mask)
    pair = first(run(tmp_path, data)[0])
    assert tuple(pair["orig_size"]) == (height, width)
    assert pair["masks"].sum() == RES * RES // 4
    assert (pair["images"][pair["masks"]].mean(0) < 80).all()
