"""Synthetic dermoscopy generator: ISIC layout, determinism, lesion statistics, argument checks."""

from __future__ import annotations

import re
import time

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from diffseg.demo import IMAGE_DIR, MASK_DIR, make_demo_dataset, render_sample
from diffseg.imageio import read_mask, read_rgb
from diffseg.seeding import image_rng


def _all_bytes(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _luminance(rgb):
    return rgb.astype(float) @ np.array([0.299, 0.587, 0.114])


@pytest.fixture(scope="module")
def samples():
    """40 rendered (rgb, mask) pairs at 96 px, seed 0."""
    return [render_sample(image_rng(0, f"ISIC_{i:07d}"), 96) for i in range(40)]


def test_isic_layout_and_readable_files(tmp_path):
    ids = make_demo_dataset(tmp_path, n_images=5, image_size=48, seed=3)
    assert ids == [f"ISIC_000000{i}" for i in range(5)]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([IMAGE_DIR, MASK_DIR])
    assert IMAGE_DIR == "ISIC2018_Task1-2_Training_Input"
    assert MASK_DIR == "ISIC2018_Task1_Training_GroundTruth"
    images = sorted(p.name for p in (tmp_path / IMAGE_DIR).iterdir())
    masks = sorted(p.name for p in (tmp_path / MASK_DIR).iterdir())
    assert images == [f"{i}.jpg" for i in ids]  # also: no temporary files left behind
    assert masks == [f"{i}_segmentation.png" for i in ids]
    assert all(re.fullmatch(r"ISIC_\d{7}\.jpg", n) for n in images)
    assert all(re.fullmatch(r"ISIC_\d{7}_segmentation\.png", n) for n in masks)
    for image_id in ids:
        jpg = tmp_path / IMAGE_DIR / f"{image_id}.jpg"
        png = tmp_path / MASK_DIR / f"{image_id}_segmentation.png"
        assert Image.open(jpg).format == "JPEG"
        assert read_rgb(jpg).shape == (48, 48, 3)
        with Image.open(png) as raw:
            assert raw.mode == "L" and set(np.unique(np.asarray(raw))) <= {0, 255}
        mask = read_mask(png)
        assert mask.shape == (48, 48) and mask.dtype == bool and mask.any()
        # the written mask is exactly the rendered one
        assert np.array_equal(mask, render_sample(image_rng(3, image_id), 48)[1])


def test_same_seed_identical_bytes_other_seed_different(tmp_path):
    make_demo_dataset(tmp_path / "a", n_images=3, image_size=32, seed=7)
    make_demo_dataset(tmp_path / "b", n_images=3, image_size=32, seed=7)
    make_demo_dataset(tmp_path / "c", n_images=3, image_size=32, seed=8)
    a, b, c = (_all_bytes(tmp_path / k) for k in "abc")
    assert len(a) == 6 and a == b
    assert a.keys() == c.keys()
    images = [k for k in a if k.endswith(".jpg")]
    assert all(a[k] != c[k] for k in images)


def test_image_i_does_not_depend_on_n_images(tmp_path):
    make_demo_dataset(tmp_path / "two", n_images=2, image_size=32, seed=1)
    make_demo_dataset(tmp_path / "five", n_images=5, image_size=32, seed=1)
    two, five = _all_bytes(tmp_path / "two"), _all_bytes(tmp_path / "five")
    assert len(two) == 4 and len(five) == 10
    assert all(five[k] == v for k, v in two.items())


def test_render_sample_types_and_sizes():
    for size in (16, 33, 64):
        rgb, mask = render_sample(np.random.default_rng(5), size)
        assert rgb.shape == (size, size, 3) and rgb.dtype == np.uint8
        assert mask.shape == (size, size) and mask.dtype == bool and mask.any()


def test_mask_is_one_solid_region(samples):
    for _, mask in samples:
        _, components = ndimage.label(mask)
        assert components == 1
        assert np.array_equal(ndimage.binary_fill_holes(mask), mask)


def test_lesion_size_and_position_vary(samples):
    fractions = np.array([mask.mean() for _, mask in samples])
    assert fractions.min() < 0.1 and fractions.max() > 0.3
    assert fractions.max() < 0.9
    touching = [m[0].any() or m[-1].any() or m[:, 0].any() or m[:, -1].any() for _, m in samples]
    assert 1 <= sum(touching) < len(samples)
    centres = np.array([ndimage.center_of_mass(mask) for _, mask in samples]) / 96
    assert centres.std(axis=0).min() > 0.1  # not always in the middle


def test_lesion_darker_than_skin_by_bounded_margin(samples):
    margins = np.array([_luminance(rgb)[~m].mean() - _luminance(rgb)[m].mean() for rgb, m in samples])
    assert margins.min() > 5  # every lesion visibly darker
    assert 20 < margins.mean() < 100  # on average clearly, but not black on white
    assert margins.max() < 160


def test_skin_tone_varies_between_images(samples):
    skin = np.array([rgb[~m].reshape(-1, 3).mean(axis=0) for rgb, m in samples])
    luminance = _luminance(skin)
    assert luminance.max() - luminance.min() > 30
    red_ratio = skin[:, 0] / skin[:, 1]  # pinkish vs brownish
    assert red_ratio.max() - red_ratio.min() > 0.1


def test_default_sixty_images_at_128_are_fast(tmp_path):
    start = time.process_time()
    ids = make_demo_dataset(tmp_path)
    elapsed = time.process_time() - start
    assert len(ids) == 60 and ids[-1] == "ISIC_0000059"
    assert read_rgb(tmp_path / IMAGE_DIR / "ISIC_0000059.jpg").shape == (128, 128, 3)
    assert elapsed < 5.0


@pytest.mark.parametrize(
    "kwargs, name",
    [({"n_images": 0}, "n_images"), ({"n_images": 2.5}, "n_images"),
     ({"image_size": 15}, "image_size"), ({"image_size": -128}, "image_size")],
)
def test_invalid_arguments_name_the_argument(tmp_path, kwargs, name):
    with pytest.raises(ValueError, match=name):
        make_demo_dataset(tmp_path / "out", **kwargs)
    assert not (tmp_path / "out").exists()
