import math

import torch

from fastm2d.model.pos_embed import resample_pos_embed, sincos_2d


def test_sincos_table_matches_spec_formula():
    d, grid = 16, (5, 38)
    table = sincos_2d(d, grid)
    assert table.shape == (1, 1 + 5 * 38, d)
    assert torch.all(table[0, 0] == 0)  # CLS has no position
    q = d // 4
    for f, t in [(0, 0), (2, 7), (4, 37)]:
        row = table[0, 1 + f * 38 + t]  # frequency-major token index
        for i in range(q):
            w = 1.0 / 10000 ** (i / q)
            expected = [math.sin(t * w), math.cos(t * w), math.sin(f * w), math.cos(f * w)]
            got = [row[i], row[q + i], row[2 * q + i], row[3 * q + i]]
            for e, g in zip(expected, got):
                assert abs(e - float(g)) < 1e-6


def test_resample_trims_exactly_and_interpolates_longer():
    table = sincos_2d(32, (5, 38))
    short = resample_pos_embed(table, (5, 38), (5, 25))
    assert torch.equal(short, sincos_2d(32, (5, 25)))  # trimming keeps the first time columns
    longer = resample_pos_embed(table, (5, 38), (5, 63))
    assert longer.shape == (1, 1 + 5 * 63, 32) and torch.all(longer[0, 0] == 0)
    # Bicubic resampling keeps the endpoints' neighbourhood: first column close to the original's first.
    assert torch.allclose(longer[0, 1], table[0, 1], atol=0.1)


def test_resampling_by_timm_equals_plain_bicubic_over_the_grid():
    """timm's resample_abs_pos_embed (antialias off) against F.interpolate written out here: the table as a
    (F', T') image per channel, bicubic, align_corners=False (as the original fine-tuning resamples)."""
    import torch.nn.functional as F
    table = sincos_2d(32, (5, 38)) + 0.01 * torch.randn(1, 1 + 5 * 38, 32)
    for new in [(5, 63), (10, 38), (3, 20)]:
        got = resample_pos_embed(table, (5, 38), new)
        grid = table[:, 1:].reshape(1, 5, 38, 32).permute(0, 3, 1, 2)
        ref = F.interpolate(grid, size=new, mode="bicubic", align_corners=False).permute(0, 2, 3, 1)
        ref = torch.cat([table[:, :1], ref.reshape(1, new[0] * new[1], 32)], dim=1)
        assert torch.allclose(got, ref, atol=1e-6), new
