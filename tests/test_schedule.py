import math

import numpy as np
import pytest
import torch

from diffseg.schedule import alpha_bars, linear_betas, q_sample

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
