"""Per-image seeds come from (seed, image content): the same image gets the same draws under any name."""

import numpy as np
import torch

from diffseg.seeding import image_noise
from diffseg.seeding import content_key, image_generator, image_rng, image_seed


def images(n: int = 3, size: int = 8) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def test_content_key_is_the_sha256_of_shape_dtype_and_bytes():
    assert content_key(np.zeros((2, 2, 3), np.uint8)) == \
        "c4d38e68692469503a87fd65d1a6bedf465c7bdc393c8c52e24bd6aa336f45cd"  # sha256(b"(2, 2, 3):|u1:" + 12 zeros)


def test_same_pixels_same_key_whatever_the_array_object_or_layout():
    a = images(1)[0]
    assert content_key(a) == content_key(a.copy())
    transposed_back = np.ascontiguousarray(a.transpose(1, 0, 2)).transpose(1, 0, 2)  # not C-contiguous
    assert not transposed_back.flags.c_contiguous and content_key(transposed_back) == content_key(a)


def test_other_pixels_shape_or_dtype_give_another_key():
    a = images(1)[0]
    changed = a.copy()
    changed[3, 4, 1] ^= 1  # one bit of one pixel
    keys = {content_key(a), content_key(changed), content_key(a.reshape(4, 16, 3)),
            content_key(a.astype(np.int16))}
    assert len(keys) == 4


def test_image_seed_is_stable_and_depends_on_seed_and_key():
    assert image_seed(0, "x") == 8599623748626867949  # low 63 bits of sha256(b"0:x"), little-endian
    a, b = images(2)
    assert image_seed(0, content_key(a)) == image_seed(0, content_key(a.copy()))
    assert len({image_seed(0, content_key(a)), image_seed(0, content_key(b)), image_seed(1, content_key(a))}) == 3
    assert image_rng(0, "x").integers(1 << 30) == np.random.default_rng(image_seed(0, "x")).integers(1 << 30)
    assert torch.equal(torch.randn(3, generator=image_generator(0, "x")),
                       torch.randn(3, generator=torch.Generator().manual_seed(image_seed(0, "x"))))


def test_image_noise_follows_the_image_not_its_position():
    a, b, c = images(3)
    noise = image_noise(np.stack([a, b, a]), seed=4, noise_draws=2)
    assert noise.shape == (3, 2, 3, 8, 8) and noise.dtype == torch.float32
    assert torch.equal(noise[0], noise[2])  # the same image twice (as if under two ids): the same draws
    assert not torch.equal(noise[0], noise[1]) and not torch.equal(noise[0, 0], noise[0, 1])
    alone = image_noise(np.stack([c, a]), seed=4, noise_draws=2)
    assert torch.equal(alone[1], noise[0])  # other batch mates, another position: unchanged
    assert not torch.equal(image_noise(a[None], seed=5, noise_draws=2)[0], noise[0])  # the seed matters
