"""The CycleGAN training step (`bone3d.engines.unpaired`)."""

from __future__ import annotations

import copy
import random

import pytest
import torch
import torch.nn.functional as F
from monai.engines import SupervisedTrainer

from bone3d.engines.unpaired import CycleGANStep, ImagePool
from bone3d.nets import build


def _nets(seed=0):
    torch.manual_seed(seed)
    return (
        build("cyclegan_g", 2, "tiny"),
        build("cyclegan_g", 2, "tiny"),
        build("nlayer_d", 2, "tiny", in_channels=1),
        build("nlayer_d", 2, "tiny", in_channels=1),
    )


def _run(g_ab, step, data):
    trainer = SupervisedTrainer(
        device=torch.device("cpu"),
        max_epochs=1,
        train_data_loader=data,
        network=g_ab,
        optimizer=torch.optim.Adam(list(g_ab.parameters()) + list(step.g_ba.parameters()), 1e-3),
        loss_function=torch.nn.L1Loss(),
        iteration_update=step,
    )
    trainer.run()
    return trainer.state.output[0]


def _data():
    g = torch.Generator().manual_seed(1)
    return [
        {
            "image": torch.rand(3, 1, 32, 32, generator=g),
            "label": torch.rand(3, 1, 32, 32, generator=g),
        }
    ]


def test_every_network_learns_and_losses_are_reported():
    g_ab, g_ba, d_a, d_b = _nets()
    before = [[p.detach().clone() for p in m.parameters()] for m in (g_ab, g_ba, d_a, d_b)]
    d_opt = torch.optim.Adam(list(d_a.parameters()) + list(d_b.parameters()), 1e-3)
    out = _run(g_ab, CycleGANStep(g_ba, d_a, d_b, d_opt), _data())
    for b, m in zip(before, (g_ab, g_ba, d_a, d_b), strict=True):
        assert any(not torch.equal(x, y) for x, y in zip(b, m.parameters(), strict=True))
    for key in ("loss", "loss_g_gan", "loss_cycle", "loss_idt", "loss_d_a", "loss_d_b"):
        assert torch.isfinite(torch.tensor(out[key])), key
    assert all(p.requires_grad for d in (d_a, d_b) for p in d.parameters())


def test_cycle_loss_is_the_round_trip_on_unpaired_batches():
    """The reported cycle loss equals L1(G_BA(G_AB(a)), a) + L1(G_AB(G_BA(b)), b) with b the HR
    patches rolled along the batch (no LR patch is paired with its own HR patch)."""
    g_ab, g_ba, d_a, d_b = _nets()
    ref_ab, ref_ba = copy.deepcopy(g_ab).train(), copy.deepcopy(g_ba).train()
    data = _data()
    a, b = data[0]["image"], torch.roll(data[0]["label"], 1, 0)
    with torch.no_grad():
        expected = F.l1_loss(ref_ba(ref_ab(a)), a) + F.l1_loss(ref_ab(ref_ba(b)), b)
    d_opt = torch.optim.Adam(list(d_a.parameters()) + list(d_b.parameters()), 1e-3)
    out = _run(g_ab, CycleGANStep(g_ba, d_a, d_b, d_opt), data)
    assert out["loss_cycle"] == pytest.approx(float(expected), rel=1e-5)


def test_identity_term_skipped_when_domains_differ_in_channels():
    torch.manual_seed(0)
    g_ab = build("cyclegan_g", 2, "tiny", in_channels=3)  # a 3-slice slab in, one slice out
    g_ba = build("cyclegan_g", 2, "tiny", in_channels=1, out_channels=3)
    d_a = build("nlayer_d", 2, "tiny", in_channels=3)
    d_b = build("nlayer_d", 2, "tiny", in_channels=1)
    d_opt = torch.optim.Adam(list(d_a.parameters()) + list(d_b.parameters()), 1e-3)
    data = [{"image": torch.rand(2, 3, 32, 32), "label": torch.rand(2, 1, 32, 32)}]
    out = _run(g_ab, CycleGANStep(g_ba, d_a, d_b, d_opt), data)
    assert out["loss_idt"] == 0.0 and out["loss_cycle"] > 0


def test_image_pool_returns_history_once_full():
    random.seed(0)
    pool = ImagePool(2)
    first = torch.arange(2.0).reshape(2, 1)
    assert torch.equal(pool.query(first), first)  # filling: returned as is
    seen = set()
    for i in range(20):
        new = torch.full((1, 1), 10.0 + i)
        got = float(pool.query(new)[0, 0])
        assert got == 10.0 + i or got in {0.0, 1.0} | seen
        seen.add(10.0 + i)
    assert any(float(x) >= 10 for x in torch.cat(pool.images))  # history was refreshed


def test_ragan_is_refused():
    g_ab, g_ba, d_a, d_b = _nets()
    with pytest.raises(ValueError, match="vanilla, lsgan or hinge"):
        CycleGANStep(g_ba, d_a, d_b, torch.optim.Adam(d_a.parameters()), gan_loss="ragan")
