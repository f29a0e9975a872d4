"""M2D-X model maths (paper III-B): the offline branch's losses, gradients and ablation options, each against
a computation written out in the test."""

import pytest
import torch

from fastm2d.model import M2D

from .conftest import tiny_model_config


# ------------------------------------------------------------------ the branch against float64, written here -----
def _offline_frames_by_hand(model, out):
    """Every online token back in patch order by explicit indexing, then eq. 4, in float64."""
    z = torch.cat([out["z_visible"], out["pred"]], dim=1).double()
    ids = out["ids_shuffle"]
    b, n, d = z.shape
    restored = torch.empty_like(z)
    for s in range(b):
        for j in range(n):
            restored[s, ids[s, j]] = z[s, j]
    f, t = model.grid
    return torch.einsum("bftd->btfd", restored.reshape(b, f, t, d)).reshape(b, t, f * d)


def _linear(model, z):
    w, bias = model.offline_predictor.weight.double(), model.offline_predictor.bias.double()
    return z @ w.T + bias


def _eq2(pred, target):
    target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6).sqrt()
    pred = pred / pred.norm(dim=-1, keepdim=True)
    target = target / target.norm(dim=-1, keepdim=True)
    return (2 - 2 * (pred * target).sum(-1)).mean()


@pytest.mark.parametrize("kernels", ["reference", "triton"])
def test_distillation_loss_is_eq2_on_eq4_frames(kernels):
    torch.manual_seed(1)
    model = M2D(tiny_model_config(off_dim=12, lambda_m2d=1.0, lambda_off=0.5, kernels=kernels))
    x, target = torch.randn(3, 1, 80, 64), torch.randn(3, 4, 12)
    out = model(x, offline_target=target)
    want = _eq2(_linear(model, _offline_frames_by_hand(model, out)), target.double())
    assert out["loss_off"].item() == pytest.approx(want.item(), abs=1e-5)
    assert out["loss"].item() == pytest.approx(out["loss_m2d"].item() + 0.5 * want.item(), abs=1e-5)


@pytest.mark.parametrize("single", [False, True])
def test_label_losses_average_frame_logits_over_time(single):
    torch.manual_seed(2)
    model = M2D(tiny_model_config(off_dim=5, off_loss="ce" if single else "bce"))
    x = torch.randn(4, 1, 80, 64)
    labels = torch.zeros(4, 5)
    labels[0, 1] = labels[1, 3] = labels[2, 0] = labels[3, 4] = 1
    if not single:
        labels[0, 2] = 1  # multi-hot
    out = model(x, offline_target=labels)
    logits = _linear(model, _offline_frames_by_hand(model, out)).mean(1)
    y = labels.double()
    if single:
        want = -(y * torch.log_softmax(logits, -1)).sum(-1).mean()
    else:
        sig = 1 / (1 + torch.exp(-logits))
        want = -(y * torch.log(sig) + (1 - y) * torch.log(1 - sig)).mean()
    assert out["loss_off"].item() == pytest.approx(want.item(), abs=1e-5)


def test_plain_m2d_has_zero_offline_loss_and_the_original_key_name():
    model = M2D(tiny_model_config(off_dim=8))
    assert "offline_predictor.weight" in model.state_dict()
    out = model(torch.randn(2, 1, 80, 64))
    assert out["loss_off"].item() == 0 and torch.equal(out["loss"], out["loss_m2d"])


def test_gradients_reach_the_predictor_from_both_losses():
    torch.manual_seed(3)
    model = M2D(tiny_model_config(off_dim=6))
    x, target = torch.randn(2, 1, 80, 64), torch.randn(2, 4, 6)
    ids = model.random_ids_shuffle(2, x.device)
    model(x, ids, target)["loss_off"].backward()
    assert model.decoder_pred.weight.grad.abs().sum() > 0  # predictions feed the offline branch
    assert model.blocks[0].attn.qkv.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.target_parameters())
    model.zero_grad(set_to_none=True)
    model(x, ids, target)["loss_m2d"].backward()
    assert model.decoder_pred.weight.grad.abs().sum() > 0 and model.offline_predictor.weight.grad is None


def test_ablation_options_match_their_definitions():
    torch.manual_seed(4)
    x = torch.randn(2, 1, 80, 64)
    m = M2D(tiny_model_config(depth=3, target_layers=[0, 2], loss="mse", mask_mode="time"))
    ids = m.random_ids_shuffle(2, x.device)
    f, t = m.grid
    for row in ids:  # time masks: whole columns, every frequency row of a visible column is visible
        visible_cols = {int(i) % t for i in row[:m.n_visible]}
        assert len(visible_cols) * f == m.n_visible and {int(i) % t for i in row[m.n_visible:]}.isdisjoint(visible_cols)
    out = m(x, ids)
    # The target: the mean of blocks 0 and 2 (before the final norm), written out here.
    patches = m.patch_embed(x) + m.pos_embed[:, 1:]
    masked = torch.stack([patches[s, ids[s, m.n_visible:]] for s in range(2)])
    h = torch.cat([(m.cls_token + m.pos_embed[:, :1]).expand(2, -1, -1), masked], 1)
    outs = []
    for blk in m.target_blocks:
        h = blk(h)
        outs.append(h)
    target = m.target_norm((outs[0] + outs[2]) / 2)[:, 1:]
    assert torch.allclose(out["target"], target, atol=1e-5)
    std = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6).sqrt()
    assert out["loss_m2d"].item() == pytest.approx(((out["pred"] - std) ** 2).mean().item(), abs=1e-5)


# -------------------------------------------------------------------------------------- training, per task -----
