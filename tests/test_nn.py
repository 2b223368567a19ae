"""implicitdiff.nn: variational dropout, one mask per call."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from implicitdiff.nn import VariationalDropout, VariationalDropout2d, reset_masks


def test_variational_dropout_is_the_identity_in_eval_mode():
    drop = VariationalDropout2d(0.5).eval()
    x = torch.randn(2, 3, 4, 4)
    assert drop(x) is x


def test_variational_dropout_shares_its_mask_along_all_but_the_batch_and_channel():
    torch.manual_seed(0)
    tokens = VariationalDropout(0.5)(torch.ones(4, 5, 6))  # (B, L, C): one value per (b, c)
    assert torch.equal(tokens, tokens[:, :1].expand_as(tokens))
    maps = VariationalDropout2d(0.5)(torch.ones(4, 6, 3, 3))  # (B, C, H, W): one value per (b, c)
    assert torch.equal(maps, maps[:, :, :1, :1].expand_as(maps))
    sequence = VariationalDropout(0.5, channel_dim=1)(torch.ones(4, 6, 7))  # (B, C, L)
    assert torch.equal(sequence, sequence[:, :, :1].expand_as(sequence))


def test_variational_dropout_refuses_bad_arguments_and_a_stale_mask():
    with pytest.raises(ValueError, match=r"p must be a finite float >= 0\.0 and < 1\.0"):
        VariationalDropout(1.0)
    with pytest.raises(ValueError, match="channel_dim must not be 0"):
        VariationalDropout(0.1, channel_dim=0)
    drop = VariationalDropout(0.5)
    drop(torch.ones(2, 3))
    with pytest.raises(ValueError, match="the input changed shape within one solve"):
        drop(torch.ones(3, 3))
    assert reset_masks(nn.Sequential(drop, nn.Linear(3, 3))) == 1
    assert drop(torch.ones(3, 3)).shape == (3, 3)
