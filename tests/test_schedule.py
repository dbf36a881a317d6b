import math

import numpy as np
import pytest
import torch

from diffseg.schedule import Schedule, alpha_bars, linear_betas, q_sample

torch.set_num_threads(1)


def test_linear_betas_endpoints_and_spacing():
    b = linear_betas()
    assert b.dtype == np.float64 and b.shape == (1000,)
    assert b[0] == 1e-4 and abs(b[-1] - 0.02) < 1e-15
    assert abs(b[500] - (1e-4 + 500 * (0.02 - 1e-4) / 999)) < 1e-15


@pytest.mark.parametrize("t", [0, 500, 999])
def test_alpha_bar_matches_independent_product(t):
    abar = alpha_bars(linear_betas())
    betas = [1e-4 + i * (0.02 - 1e-4) / 999 for i in range(t + 1)]
    by_prod = math.prod(1.0 - b for b in betas)
    by_logs = math.exp(math.fsum(math.log1p(-b) for b in betas))
    assert abs(abar[t] - by_prod) < 1e-12
    assert abs(abar[t] - by_logs) < 1e-12


def test_alpha_bar_known_values():
    abar = alpha_bars(linear_betas())
    assert abar[0] == 1 - 1e-4
    # first two factors by hand: (1 - 1e-4) * (1 - (1e-4 + 1.99e-2/999))
    assert abs(abar[1] - (1 - 1e-4) * (1 - 1e-4 - 0.0199 / 999)) < 1e-15
    assert 4.0e-5 < abar[999] < 4.1e-5  # the well-known ~4.04e-5 of the DDPM schedule
    assert np.all(np.diff(abar) < 0)


def test_q_sample_broadcasts_per_batch_item():
    abar = torch.tensor(alpha_bars(linear_betas()), dtype=torch.float64)
    x0 = torch.ones(3, 2, 4, 4, dtype=torch.float64)
    noise = torch.full_like(x0, 2.0)
    t = torch.tensor([0, 500, 999])
    xt = q_sample(x0, t, noise, abar)
    for i, ti in enumerate(t.tolist()):
        a = float(abar[ti])
        expected = math.sqrt(a) + 2.0 * math.sqrt(1 - a)
        assert torch.allclose(xt[i], torch.full((2, 4, 4), expected, dtype=torch.float64), atol=1e-12)


def test_invalid_schedule_is_rejected():
    with pytest.raises(ValueError, match="beta_start"):
        linear_betas(10, 0.5, 0.1)
    with pytest.raises(ValueError, match="T must be"):
        linear_betas(0)


# ----------------------------------------------------------------------------- the Schedule object


def test_schedule_matches_the_pure_functions_and_moves_devices():
    sched = Schedule.from_config({"T": 50, "beta_start": 1e-4, "beta_end": 0.02})
    expected = torch.as_tensor(alpha_bars(linear_betas(50, 1e-4, 0.02)), dtype=torch.float32)
    assert sched.T == 50 and sched.alpha_bar.dtype == torch.float32
    assert torch.equal(sched.alpha_bar, expected)
    moved = sched.to("cpu")
    assert moved.device.type == "cpu" and torch.equal(moved.alpha_bar, expected)
    x0, noise = torch.rand(3, 3, 4, 4) * 2 - 1, torch.randn(3, 3, 4, 4)
    t = torch.tensor([0, 10, 49])
    assert torch.equal(sched.q_sample(x0, t, noise), q_sample(x0, t, noise, expected))


def test_predict_x0_inverts_q_sample_and_clips():
    sched = Schedule.from_config({"T": 50, "beta_start": 1e-4, "beta_end": 0.02})
    x0, noise = torch.rand(3, 3, 4, 4) * 2 - 1, torch.randn(3, 3, 4, 4)
    t = torch.tensor([1, 25, 49])
    x_t = sched.q_sample(x0, t, noise)
    torch.testing.assert_close(sched.predict_x0(x_t, noise, t), x0, atol=1e-5, rtol=1e-5)
    far = sched.predict_x0(x_t, -noise, t)  # the wrong noise lands outside the image range
    assert float(far.abs().max()) <= 1.0 and float(sched.predict_x0(x_t, -noise, t, clip=False).abs().max()) > 1.0


def test_ddim_step_with_the_true_noise_lands_on_q_sample_of_the_next_step():
    sched = Schedule.from_config({"T": 50, "beta_start": 1e-4, "beta_end": 0.02})
    x0, noise = torch.rand(2, 3, 4, 4) * 1.6 - 0.8, torch.randn(2, 3, 4, 4)
    t, t_next = torch.tensor([40, 30]), torch.tensor([20, -1])  # -1: straight to x0
    x_t = sched.q_sample(x0, t, noise)
    stepped = sched.ddim_step(x_t, noise, t, t_next)
    torch.testing.assert_close(stepped[:1], sched.q_sample(x0[:1], t_next[:1], noise[:1]), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(stepped[1:], x0[1:], atol=1e-5, rtol=1e-5)
