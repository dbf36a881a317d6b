"""diffseg.runtime: device/precision resolution and the one uint8 -> model-range conversion."""

import numpy as np
import pytest
import torch

import diffseg.runtime
from diffseg.runtime import autocast, device_generator, resolve_autocast, resolve_device, resolve_dtype, to_model_range


def test_to_model_range_maps_0_255_to_minus1_1_in_torch_layout():
    images = np.array([[[[0, 255, 127]] * 2] * 2], np.uint8)  # (1, 2, 2, 3)
    x = to_model_range(images, torch.device("cpu"))
    assert x.shape == (1, 3, 2, 2) and x.dtype == torch.float32
    torch.testing.assert_close(x[0, :, 0, 0], torch.tensor([-1.0, 1.0, -1.0 / 255]), atol=1e-6, rtol=0)
    # a torch (N, H, W, 3) tensor and an already (N, 3, H, W) tensor give the same values
    t = torch.from_numpy(images)
    assert torch.equal(to_model_range(t), x)
    assert torch.equal(to_model_range(t.permute(0, 3, 1, 2).contiguous(), channels_last_input=False), x)


def test_to_model_range_accepts_a_non_contiguous_numpy_slice():
    images = np.arange(2 * 4 * 4 * 3, dtype=np.uint8).reshape(2, 4, 4, 3)[:, ::-1]
    x = to_model_range(images)
    assert torch.equal(x, torch.from_numpy(images.copy()).permute(0, 3, 1, 2).float() / 127.5 - 1.0)


def test_precision_and_device_resolution(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setattr(diffseg.runtime, "cpu_has_native_bf16", lambda: False)
    assert resolve_device("cpu") == cpu
    assert resolve_dtype("auto", cpu) == torch.float32 and resolve_dtype("bf16", cpu) == torch.bfloat16
    assert resolve_dtype("auto", torch.device("cuda")) == torch.bfloat16
    assert resolve_autocast(cpu, "auto") is None and resolve_autocast(cpu, "fp16") == torch.float16
    with pytest.raises(ValueError, match="inference.precision must be one of"):
        resolve_autocast(cpu, "fp64")
    with pytest.raises(ValueError, match="train.precision must be one of"):
        resolve_dtype("half", cpu)
    with autocast(cpu, None):
        assert not torch.is_autocast_enabled("cpu")
    with autocast(cpu, torch.bfloat16):
        assert torch.is_autocast_enabled("cpu")


@pytest.mark.parametrize("native", [True, False])
def test_auto_precision_follows_the_cpu_capability_and_explicit_settings_win(monkeypatch, native):
    monkeypatch.setattr(diffseg.runtime, "cpu_has_native_bf16", lambda: native)
    cpu, cuda, mps = torch.device("cpu"), torch.device("cuda"), torch.device("mps")
    assert resolve_dtype("auto", cpu) == (torch.bfloat16 if native else torch.float32)
    assert resolve_autocast(cpu, "auto") == (torch.bfloat16 if native else None)
    assert resolve_dtype("auto", cuda) == torch.bfloat16 and resolve_dtype("auto", mps) == torch.float32
    for device in (cpu, cuda):
        assert resolve_dtype("fp32", device) == torch.float32 and resolve_autocast(device, "fp32") is None
        assert resolve_dtype("bf16", device) == torch.bfloat16 and resolve_dtype("fp16", device) == torch.float16


@pytest.mark.parametrize("flags", [(True, False), (False, True), (False, False)])
def test_native_bf16_means_avx512_bf16_or_amx(monkeypatch, flags):
    avx512_bf16, amx = flags
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx, raising=False)
    assert diffseg.runtime.cpu_has_native_bf16() == (avx512_bf16 or amx)


def test_a_torch_without_the_probes_counts_as_without_native_bf16(monkeypatch):
    monkeypatch.delattr(torch.cpu, "_is_avx512_bf16_supported", raising=False)
    monkeypatch.delattr(torch.cpu, "_is_amx_tile_supported", raising=False)
    assert diffseg.runtime.cpu_has_native_bf16() is False


def test_channels_last_on_cuda_and_cpu_only():
    from diffseg.runtime import uses_channels_last

    assert uses_channels_last(torch.device("cpu")) and uses_channels_last(torch.device("cuda:1"))
    assert not uses_channels_last(torch.device("mps"))


def first_draws(seed: int, n: int = 2) -> list[int]:
    """The first n values device_generator's seeding draw would take from a CPU generator seeded with seed."""
    g = torch.Generator().manual_seed(seed)
    return [int(torch.randint(0, 2**62, (1,), generator=g)) for _ in range(n)]


def test_device_generator_keeps_a_generator_on_its_device_untouched():
    g = torch.Generator().manual_seed(3)
    assert device_generator(g, torch.device("cpu")) is g
    assert int(torch.randint(0, 2**62, (1,), generator=g)) == first_draws(3)[0]  # no draw was taken from it


class AcceleratorGenerator:
    """Stands in for torch.Generator(device=...) of a device this CPU-only torch lacks: records device and seed."""

    def __init__(self, device):
        self.device, self.seed = torch.device(device), None

    def manual_seed(self, seed: int):
        self.seed = seed
        return self


def test_device_generator_seeds_a_new_generator_on_another_device_from_the_given_one(monkeypatch):
    three, three_again, four = (torch.Generator().manual_seed(seed) for seed in (3, 3, 4))
    expected = {3: first_draws(3), 4: first_draws(4)}
    monkeypatch.setattr(torch, "Generator", AcceleratorGenerator)
    made = device_generator(three, torch.device("cuda"))
    assert isinstance(made, AcceleratorGenerator) and made.device == torch.device("cuda")
    # seeded by one draw of the given generator: the same seed gives the same device generator, another seed not
    assert made.seed == expected[3][0] == device_generator(three_again, torch.device("cuda")).seed
    assert device_generator(four, torch.device("cuda")).seed == expected[4][0] != made.seed
    # the given generator moved on by that one draw: a second call derives the next seed
    assert device_generator(three, torch.device("cuda")).seed == expected[3][1]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_device_generator_on_cuda_gives_the_same_draws_for_the_same_seed():
    cuda = torch.device("cuda")
    made = [device_generator(torch.Generator().manual_seed(5), cuda) for _ in range(2)]
    assert all(g.device.type == "cuda" for g in made)
    draws = [torch.randn(8, device=cuda, generator=g) for g in made]
    assert draws[0].device.type == "cuda" and torch.equal(draws[0], draws[1])
    assert device_generator(made[0], cuda) is made[0]
