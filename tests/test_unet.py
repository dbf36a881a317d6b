import pytest
import torch

from diffseg.unet import ConditionalUNet, SegUNet, count_parameters, timestep_embedding

torch.set_num_threads(1)

TINY = dict(base_channels=16, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(8,), num_heads=2,
            dropout=0.0, image_size=16)


def _perturb_zero_init(model):
    """Zero-initialised output layers make a fresh model ignore its conditioning; give them weights."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model


def test_default_parameter_count_near_paper():
    n = count_parameters(ConditionalUNet())
    assert n == 13_635_203
    assert abs(n - 13.8e6) / 13.8e6 < 0.05


def test_forward_shape_and_class_sensitivity():
    torch.manual_seed(0)
    model = _perturb_zero_init(ConditionalUNet(**TINY)).eval()
    x = torch.randn(2, 3, 16, 16)
    t = torch.tensor([10, 500])
    with torch.no_grad():
        e0 = model(x, t, torch.tensor([0, 0]))
        e1 = model(x, t, torch.tensor([1, 1]))
        e0_again = model(x, t, torch.tensor([0, 0]))
    assert e0.shape == (2, 3, 16, 16) and e0.dtype == torch.float32
    assert torch.equal(e0, e0_again)
    assert (e0 - e1).abs().mean() > 1e-3


def test_time_sensitivity_and_attention_level_present():
    model = _perturb_zero_init(ConditionalUNet(**TINY)).eval()
    n_attn = sum(type(m).__name__ == "AttentionBlock" for m in model.modules())
    assert n_attn == 1 + 2 + 1  # middle + 8 px level on the way up (2 blocks) and down (1 block)
    x = torch.randn(1, 3, 16, 16)
    y = torch.tensor([1])
    with torch.no_grad():
        assert (model(x, torch.tensor([5]), y) - model(x, torch.tensor([900]), y)).abs().mean() > 1e-3


def test_null_class_row_only_with_class_dropout():
    assert ConditionalUNet(**TINY).label_embed.num_embeddings == 2
    model = ConditionalUNet(**TINY, class_dropout=0.1)
    assert model.label_embed.num_embeddings == 3 and model.null_label == 2
    out = model(torch.randn(1, 3, 16, 16), torch.tensor([3]), torch.tensor([2]))
    assert out.shape == (1, 3, 16, 16)


def test_reflect_padding_used_and_runs():
    model = ConditionalUNet(**TINY, padding="reflect")
    modes = {m.padding_mode for m in model.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3)}
    assert modes == {"reflect"}
    out = _perturb_zero_init(model)(torch.randn(2, 3, 16, 16), torch.tensor([0, 999]), torch.tensor([0, 1]))
    assert out.shape == (2, 3, 16, 16) and torch.isfinite(out).all()


def test_reflect_padding_differs_from_zeros_at_border():
    torch.manual_seed(0)
    zeros = _perturb_zero_init(ConditionalUNet(**TINY)).eval()
    reflect = ConditionalUNet(**TINY, padding="reflect").eval()
    reflect.load_state_dict(zeros.state_dict())
    x = torch.randn(1, 3, 16, 16)
    t, y = torch.tensor([100]), torch.tensor([1])
    with torch.no_grad():
        diff = (zeros(x, t, y) - reflect(x, t, y)).abs()
    assert diff[..., 0, :].mean() > 1e-4  # border row: the padding matters there


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="padding"):
        ConditionalUNet(**{**TINY, "padding": "circular"})
    with pytest.raises(ValueError, match="image_size"):
        ConditionalUNet(**{**TINY, "image_size": 15})
    with pytest.raises(ValueError, match="num_heads"):
        ConditionalUNet(**{**TINY, "num_heads": 3})


def test_timestep_embedding_values():
    emb = timestep_embedding(torch.tensor([0, 1]), 4)
    # freqs = [1, 1e-2]; t=0 -> cos=1, sin=0
    assert torch.allclose(emb[0], torch.tensor([1.0, 1.0, 0.0, 0.0]))
    assert torch.allclose(emb[1], torch.tensor([torch.cos(torch.tensor(1.0)), torch.cos(torch.tensor(0.01)),
                                                torch.sin(torch.tensor(1.0)), torch.sin(torch.tensor(0.01))]))


def test_channels_last_matches_contiguous():
    model = _perturb_zero_init(ConditionalUNet(**TINY)).eval()
    x = torch.randn(2, 3, 16, 16)
    t, y = torch.tensor([3, 300]), torch.tensor([0, 1])
    with torch.no_grad():
        ref = model(x, t, y)
        out = model.to(memory_format=torch.channels_last)(x.to(memory_format=torch.channels_last), t, y)
    assert torch.allclose(ref, out, atol=1e-5)


def test_channels_last_gradients_match_contiguous_on_cpu():
    """The Trainer trains channels_last on the CPU too: the gradients are the contiguous ones (float rounding)."""
    x, t, y = torch.randn(2, 3, 16, 16), torch.tensor([3, 300]), torch.tensor([0, 1])
    grads = []
    for memory_format in (torch.contiguous_format, torch.channels_last):
        torch.manual_seed(0)
        model = _perturb_zero_init(ConditionalUNet(**TINY)).to(memory_format=memory_format)
        model(x.contiguous(memory_format=memory_format), t, y).square().mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert grads[0].abs().max() > 1e-3
    torch.testing.assert_close(grads[1], grads[0], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("attention", [False, True])
def test_segunet_shapes_and_gates(attention):
    model = SegUNet(base_channels=8, depth=2, attention=attention).eval()
    out = model(torch.randn(2, 3, 16, 16))
    assert out.shape == (2, 1, 16, 16)
    n_gates = sum(type(m).__name__ == "AttentionGate" for m in model.modules())
    assert n_gates == (2 if attention else 0)


def test_segunet_default_size_and_reflect():
    assert count_parameters(SegUNet()) == 7_763_041  # the design's 7.8M plain U-Net
    model = SegUNet(base_channels=8, depth=2, padding="reflect")
    modes = {m.padding_mode for m in model.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3)}
    assert modes == {"reflect"}
    assert model(torch.randn(1, 3, 16, 16)).shape == (1, 1, 16, 16)


def test_no_graph_breaks_under_dynamo():
    model = ConditionalUNet(**TINY)
    report = torch._dynamo.explain(model)(torch.randn(2, 3, 16, 16), torch.tensor([1, 2]), torch.tensor([0, 1]))
    assert report.graph_break_count == 0 and report.graph_count == 1
    seg = SegUNet(base_channels=8, depth=2, attention=True)
    assert torch._dynamo.explain(seg)(torch.randn(1, 3, 16, 16)).graph_break_count == 0
