import torch

from fastm2d.model import EMA, M2D, ema_tau

from .conftest import tiny_model_config


def test_tau_schedule_ends_and_middle():
    assert ema_tau(0, 1000) == 0.99995
    assert abs(ema_tau(1000, 1000) - 0.99999) < 1e-15
    assert abs(ema_tau(500, 1000) - 0.99997) < 1e-15


def test_ema_update_matches_formula_in_place():
    m = M2D(tiny_model_config())
    online, target = m.online_parameters(), m.target_parameters()
    before_t = [t.detach().double().clone() for t in target]
    before_o = [o.detach().double().clone() for o in online]
    ptrs = [t.data_ptr() for t in target]
    tau = 0.9  # a large step so the change is far above fp32 rounding
    EMA(target, online).update(tau)
    for t, t0, o0, o in zip(target, before_t, before_o, online):
        assert torch.allclose(t.double(), tau * t0 + (1 - tau) * o0, atol=1e-6)
        assert torch.equal(o.double(), o0)  # the online side is untouched
    assert [t.data_ptr() for t in target] == ptrs  # updated in place, no new tensors
