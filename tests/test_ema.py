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


def test_ema_follows_parameters_whose_storage_was_re_pointed():
    """DeepSpeed ZeRO 1/2 does `p.data = <view into its flat buffer>` after the EMA is built. The EMA must read
    the live storage of both sides (an EMA holding the old `.data` drifts toward the initial weights)."""
    m = M2D(tiny_model_config())
    online, target = m.online_parameters(), m.target_parameters()
    ema = EMA(target, online)
    flat_o = torch.cat([o.detach().flatten() for o in online]) + 1.0  # new values in a new buffer
    flat_t = torch.cat([t.detach().flatten() for t in target])
    offset = 0
    for o, t in zip(online, target):  # re-point both sides, as ZeRO does with its flat buffers
        n = o.numel()
        o.data = flat_o[offset:offset + n].view_as(o)
        t.data = flat_t[offset:offset + n].view_as(t).clone()
        offset += n
    expected = [(0.5 * t.detach().double() + 0.5 * o.detach().double()) for t, o in zip(target, online)]
    ema.update(0.5)
    for t, e in zip(target, expected):
        assert torch.allclose(t.detach().double(), e, atol=1e-6)
