"""Paired augmentation: same transform for image, twin and mask; exact flips; reproducible."""

import pytest
import torch

from diffseg.augment import PairedAugment, gaussian_blur

torch.set_num_threads(1)
NO_FILTERS = dict(blur_prob=0.0, sharpen_prob=0.0)
GEOMETRY_ONLY = dict(hflip=False, vflip=False, rot90=False, rotate_deg=0.0, **NO_FILTERS)


def batch(seed=0, b=8, size=32):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 3, size, size, generator=g) * 2 - 1


def blob_masks(b=8, size=32):
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    centres = torch.linspace(8, 22, b)
    return torch.stack([((yy - c) ** 2 + (xx - 12) ** 2 <= 49).float() for c in centres])[:, None]


def test_twin_equal_to_image_stays_equal_under_every_transform():
    aug = PairedAugment(shift_px=3, blur_prob=0.5, sharpen_prob=0.5)
    x = batch()
    out_img, out_twin = aug(x, torch.Generator().manual_seed(1), x.clone())
    assert torch.equal(out_img, out_twin)
    assert not torch.equal(out_img, x)


def test_masks_stay_binary_and_follow_the_image():
    aug = PairedAugment(rotate_deg=10.0, shift_px=3, **NO_FILTERS)
    masks = blob_masks()
    images = (masks * 2 - 1).repeat(1, 3, 1, 1)  # image drawn from its own mask
    out_img, out_bool, out_float = aug(images, torch.Generator().manual_seed(2), masks.bool(), masks)
    assert out_bool.dtype == torch.bool and out_bool.shape == (8, 1, 32, 32)
    assert set(out_float.unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(out_bool, out_float.bool())
    disagree = ((out_img[:, :1] > 0) != out_bool).float().mean()
    assert disagree < 0.03  # bilinear vs nearest differ on edge pixels only


def test_masks_are_not_blurred():
    aug = PairedAugment(**{**GEOMETRY_ONLY, "blur_prob": 1.0})
    masks = blob_masks()
    out_img, out_mask = aug((masks * 2 - 1).repeat(1, 3, 1, 1), torch.Generator(), masks)
    assert torch.equal(out_mask, masks)
    assert torch.allclose(out_img, gaussian_blur((masks * 2 - 1).repeat(1, 3, 1, 1), 1.0))


def test_hflip_exact_on_known_array():
    x = torch.arange(16 * 3 * 4 * 4, dtype=torch.float32).reshape(16, 3, 4, 4)
    aug = PairedAugment(**{**GEOMETRY_ONLY, "hflip": True})
    (out,) = aug(x, torch.Generator().manual_seed(5))
    flipped = aug.draw(16, torch.Generator().manual_seed(5))["hflip"]
    assert 0 < int(flipped.sum()) < 16
    for i in range(16):
        assert torch.equal(out[i], x[i].flip(-1) if flipped[i] else x[i])
    assert torch.equal(out[0, 0, 0], torch.tensor([3.0, 2.0, 1.0, 0.0]) if flipped[0] else x[0, 0, 0])


def test_vflip_and_rot90_exact():
    x = torch.arange(2 * 2, dtype=torch.float32).reshape(1, 1, 2, 2).repeat(32, 1, 1, 1)
    aug = PairedAugment(**{**GEOMETRY_ONLY, "vflip": True, "rot90": True})
    (out,) = aug(x, torch.Generator().manual_seed(6))
    p = aug.draw(32, torch.Generator().manual_seed(6))
    assert set(p["rot90"].tolist()) == {0, 1, 2, 3}
    for i in range(32):
        ref = x[i].flip(-2) if p["vflip"][i] else x[i]
        assert torch.equal(out[i], torch.rot90(ref, int(p["rot90"][i]), dims=(-2, -1)))
    # one known case: [[0,1],[2,3]] turned a quarter counter-clockwise is [[1,3],[0,2]]
    assert torch.equal(torch.rot90(x[0], 1, dims=(-2, -1))[0], torch.tensor([[1.0, 3.0], [0.0, 2.0]]))


def test_deterministic_for_a_generator_seed():
    aug = PairedAugment(shift_px=2, blur_prob=0.5, sharpen_prob=0.5)
    x = batch()
    a = aug(x, torch.Generator().manual_seed(7))[0]
    b = aug(x, torch.Generator().manual_seed(7))[0]
    c = aug(x, torch.Generator().manual_seed(8))[0]
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_blur_keeps_flat_images_and_sharpen_stays_in_range():
    flat = torch.full((2, 3, 16, 16), 0.25)
    assert torch.allclose(gaussian_blur(flat, 1.0), flat, atol=1e-6)
    aug = PairedAugment(**{**GEOMETRY_ONLY, "sharpen_prob": 1.0, "sharpen_amount": 2.0})
    x = batch(b=2, size=16)
    (out,) = aug(x, torch.Generator())
    assert out.min() >= -1 and out.max() <= 1
    assert (out - x).abs().max() > 0.1


def test_bad_shapes_and_options_are_named():
    aug = PairedAugment()
    with pytest.raises(ValueError, match="extra tensor 1"):
        aug(batch(), torch.Generator(), torch.zeros(8, 1, 16, 16))
    with pytest.raises(ValueError, match="rot90 needs square"):
        aug(torch.zeros(2, 3, 16, 24), torch.Generator())
    with pytest.raises(ValueError, match="augment.blur_prob"):
        PairedAugment(blur_prob=1.5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_matches_cpu():
    aug = PairedAugment(shift_px=2, blur_prob=0.5, sharpen_prob=0.5)
    x, m = batch(), blob_masks()
    cpu = aug(x, torch.Generator().manual_seed(9), m)
    gpu = aug(x.cuda(), torch.Generator().manual_seed(9), m.cuda())
    assert torch.allclose(cpu[0], gpu[0].cpu(), atol=1e-4)
    assert (cpu[1] != gpu[1].cpu()).float().mean() < 0.005  # nearest ties may round differently
