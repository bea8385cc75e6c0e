"""The preference head kernel's loss ids: each known id has its own branch, an unknown id fails when
the kernel is compiled (or interpreted) instead of silently computing some other loss, and an unknown
loss name fails in the launcher with a message naming it and the known ones."""


import pytest
import torch
from triton.errors import TritonError

from fused_pref.kernels import pref_head

B = 5


def _launch(loss_id, device):
    chosen = torch.tensor([-1.0, -2.0, -0.5, -3.0, -1.5], device=device)
    rejected = torch.tensor([-2.0, -1.0, -0.7, -3.5, -4.0], device=device)
    outputs = [torch.full((B,), float("nan"), device=device) for _ in range(3)]
    pref_head.preference_head_kernel[(1,)](
        chosen, rejected, chosen, rejected, *outputs,
        B,
        0.1, 0.0, 0.0, 1.0,
        HAS_REF=False, LOSS=loss_id,
        BLOCK_B=pref_head.BLOCK_B,
    )
    return outputs


def test_an_unknown_loss_id_fails_at_compile_time(device):
    # Not a known id (LOSS_IDS stops at 11): the kernel must refuse it, not compute ORPO.
    assert 99 not in pref_head.LOSS_IDS.values()
    with pytest.raises(TritonError, match="LOSS"):
        _launch(99, device)


def test_the_odds_ratio_id_still_computes_orpo(device):
    losses, d_chosen, d_rejected = _launch(pref_head.LOSS_IDS["odds_ratio"], device)
    c = torch.tensor([-1.0, -2.0, -0.5, -3.0, -1.5], dtype=torch.float64)
    r = torch.tensor([-2.0, -1.0, -0.7, -3.5, -4.0], dtype=torch.float64)
    v = (c - r) - (torch.log1p(-torch.exp(c)) - torch.log1p(-torch.exp(r)))
    expected = -0.1 * torch.nn.functional.logsigmoid(v)
    torch.testing.assert_close(losses.cpu().double(), expected, rtol=1e-5, atol=1e-7)
    assert torch.isfinite(d_chosen).all() and torch.isfinite(d_rejected).all()


def test_an_unknown_loss_name_is_a_value_error_naming_the_known_ones(device):
    chosen = torch.zeros(B, device=device)
    with pytest.raises(ValueError, match=r"'no_such_loss'.*odds_ratio") as raised:
        pref_head.preference_head_forward(chosen, chosen, None, None, loss="no_such_loss", beta=0.1)
    for name in pref_head.LOSS_IDS:
        assert name in str(raised.value)
