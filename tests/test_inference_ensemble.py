"""Mirror self-ensemble (`bone3d.inference.FlipEnsemble`): the mean over all 2^n mirrored
inputs, so the wrapped network is exactly mirror-equivariant even when the network is not."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

from bone3d.inference import FlipEnsemble
from bone3d.nets import build


class Counting(nn.Module):
    def __init__(self, net):
        super().__init__()
        self.net, self.calls, self.seen = net, 0, []

    def forward(self, x):
        self.calls += 1
        self.seen.append(x.clone())
        return self.net(x)


@pytest.mark.parametrize(
    "dims, model, kwargs",
    [
        (3, "unet", {}),
        (2, "unet", {"in_channels": 5}),  # 2.5D: a slab of 5 slices as channels
        (3, "rcan", {"scale": 2}),  # post-upsampling: output twice the input's size
        (2, "rcan", {"in_channels": 5, "out_channels": 2, "scale": 2}),
    ],
)
def test_ensemble_is_the_mirror_mean_and_mirror_equivariant(dims, model, kwargs):
    torch.manual_seed(0)
    net = build(model, dims, "tiny", **kwargs).eval()
    x = torch.rand(2, kwargs.get("in_channels", 1), *([16] * dims))
    counting = Counting(net)
    ens = FlipEnsemble(counting).eval()
    with torch.no_grad():
        y = ens(x)
        plain = net(x)
    assert y.shape == plain.shape
    # one pass per subset of the spatial axes, each on the input mirrored along that subset
    subsets = [s for k in range(dims + 1) for s in itertools.combinations(range(2, 2 + dims), k)]
    assert counting.calls == 2**dims == len(subsets)
    for seen, s in zip(counting.seen, subsets, strict=True):
        torch.testing.assert_close(seen, torch.flip(x, s) if s else x)
    with torch.no_grad():
        ref = sum(torch.flip(net(torch.flip(x, s)), s) if s else net(x) for s in subsets) / len(
            subsets
        )
    torch.testing.assert_close(y, ref)
    # the random network is not mirror-equivariant; the ensemble is, along every axis
    ax = 2 + dims - 1
    with torch.no_grad():
        assert not torch.allclose(net(torch.flip(x, (ax,))), torch.flip(plain, (ax,)), atol=1e-4)
        for a in range(2, 2 + dims):
            torch.testing.assert_close(ens(torch.flip(x, (a,))), torch.flip(y, (a,)))


def test_ensemble_of_an_equivariant_network_is_the_network():
    conv = nn.Conv3d(1, 1, 3, padding=1, bias=True)
    with torch.no_grad():  # a kernel symmetric under every mirror: conv commutes with flips
        k = torch.rand(3, 3, 3)
        k = sum(torch.flip(k, s) for r in range(4) for s in itertools.combinations(range(3), r))
        conv.weight.copy_(k[None, None])
    x = torch.rand(1, 1, 9, 8, 7)
    with torch.no_grad():
        torch.testing.assert_close(FlipEnsemble(conv)(x), conv(x))


def test_ensemble_rejects_other_dimensionality():
    with pytest.raises(ValueError, match="2 or 3 spatial dims"):
        FlipEnsemble(nn.Identity())(torch.rand(2, 1, 8))
