"""The paired-GAN training step (`bone3d.engines.gan`): loss definitions and what each step updates."""

from __future__ import annotations

import copy

import pytest
import torch
from monai.engines import SupervisedTrainer

from bone3d.engines.gan import PairedGANStep, d_loss, feature_matching, g_adv_loss
from bone3d.nets import build


def _logits(seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 1, 3, 3, 3, generator=g), torch.randn(2, 1, 3, 3, 3, generator=g) - 1


def test_discriminator_losses_follow_their_papers():
    r, f = _logits(0)
    sig, log = torch.sigmoid, torch.log
    expected = {
        # pix2pix: 0.5 * (BCE(real, 1) + BCE(fake, 0))
        "vanilla": 0.5 * (-log(sig(r)).mean() - log(1 - sig(f)).mean()),
        "lsgan": 0.5 * (((r - 1) ** 2).mean() + (f**2).mean()),
        "hinge": 0.5 * (torch.clamp(1 - r, min=0).mean() + torch.clamp(1 + f, min=0).mean()),
        # ESRGAN: D_ra(x_r, x_f) = sigmoid(C(x_r) - E[C(x_f)])
        "ragan": 0.5 * (-log(sig(r - f.mean())).mean() - log(1 - sig(f - r.mean())).mean()),
    }
    for kind, value in expected.items():
        torch.testing.assert_close(d_loss(kind, [[r]], [[f]]), value, msg=kind)
    # multi-scale: the sum over scales
    r2, f2 = _logits(1)
    torch.testing.assert_close(
        d_loss("lsgan", [[r], [r2]], [[f], [f2]]),
        d_loss("lsgan", [[r]], [[f]]) + d_loss("lsgan", [[r2]], [[f2]]),
    )
    with pytest.raises(ValueError, match="unknown GAN loss"):
        d_loss("wgan", [[r]], [[f]])


def test_generator_losses_follow_their_papers():
    r, f = _logits(2)
    sig, log = torch.sigmoid, torch.log
    expected = {
        "vanilla": -log(sig(f)).mean(),
        "lsgan": ((f - 1) ** 2).mean(),
        "hinge": -f.mean(),
        "ragan": 0.5 * (-log(1 - sig(r - f.mean())).mean() - log(sig(f - r.mean())).mean()),
    }
    for kind, value in expected.items():
        torch.testing.assert_close(g_adv_loss(kind, [[r]], [[f]]), value, msg=kind)


def test_feature_matching_weights_like_pix2pixhd():
    g = torch.Generator().manual_seed(3)
    real = [[torch.randn(4, generator=g) for _ in range(4)] for _ in range(2)]
    fake = [[torch.randn(4, generator=g) for _ in range(4)] for _ in range(2)]
    # 2 scales, 3 intermediate features each (the 4th entry is the logits, not matched)
    manual = sum(
        (4.0 / 3) * 0.5 * (fake[i][j] - real[i][j]).abs().mean() for i in range(2) for j in range(3)
    )
    torch.testing.assert_close(feature_matching(real, fake), manual)


def _trainer(g, step=None, lr=1e-3):
    torch.manual_seed(0)
    data = [{"image": torch.rand(2, 1, 16, 16), "label": torch.rand(2, 1, 16, 16)}]
    return SupervisedTrainer(
        device=torch.device("cpu"),
        max_epochs=1,
        train_data_loader=data,
        network=g,
        optimizer=torch.optim.SGD(g.parameters(), lr=lr),
        loss_function=torch.nn.L1Loss(),
        iteration_update=step,
    )


def _params(m):
    return [p.detach().clone() for p in m.parameters()]


def test_step_updates_d_on_pairs_and_g_through_frozen_d():
    torch.manual_seed(0)
    g = build("unet", 2, "tiny")
    d = build("patchgan_d", 2, "tiny", in_channels=2)  # conditional: cat(LR, image)
    d0, g0 = _params(d), _params(g)
    step = PairedGANStep(d, torch.optim.SGD(d.parameters(), lr=0.1), "lsgan", {"content": 1.0})
    trainer = _trainer(g, step)
    trainer.run()
    out = trainer.state.output[0]
    assert {"loss", "loss_d", "loss_g_gan", "d_real", "d_fake", "pred"} <= set(out)
    assert any(not torch.equal(a, b) for a, b in zip(d0, _params(d), strict=True)), "D not updated"
    assert any(not torch.equal(a, b) for a, b in zip(g0, _params(g), strict=True)), "G not updated"
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in d.parameters())
    assert all(p.requires_grad for p in d.parameters())  # D is unfrozen again after the G step


def test_g_step_without_adversarial_weight_is_the_supervised_step():
    """gan weight 0: the G update must equal MONAI's own supervised step (same data, same loss)."""
    torch.manual_seed(0)
    g = build("unet", 2, "tiny")
    g_ref = copy.deepcopy(g)
    d = build("patchgan_d", 2, "tiny", in_channels=2)
    step = PairedGANStep(
        d, torch.optim.SGD(d.parameters(), lr=0.1), "vanilla", {"gan": 0.0, "content": 1.0}
    )
    _trainer(g, step).run()
    _trainer(g_ref).run()
    for a, b in zip(g.parameters(), g_ref.parameters(), strict=True):
        torch.testing.assert_close(a, b)


def test_adversarial_gradient_reaches_g_only_through_d():
    """content weight 0 and a D that cannot learn (lr 0): G still moves, by D's gradient alone,
    and D's weights are untouched by the G step."""
    torch.manual_seed(0)
    g = build("unet", 2, "tiny")
    d = build("patchgan_d", 2, "tiny", in_channels=2)
    d0, g0 = _params(d), _params(g)
    step = PairedGANStep(d, torch.optim.SGD(d.parameters(), lr=0.0), "hinge", {"content": 0.0})
    _trainer(g, step).run()
    assert all(torch.equal(a, b) for a, b in zip(d0, _params(d), strict=True))
    assert any(not torch.equal(a, b) for a, b in zip(g0, _params(g), strict=True))


def test_unconditional_d_sees_the_image_alone():
    g = build("unet", 2, "tiny")
    d = build("patchgan_d", 2, "tiny", in_channels=1)
    step = PairedGANStep(d, torch.optim.Adam(d.parameters()), "ragan", conditional=False)
    trainer = _trainer(g, step)
    trainer.run()
    assert torch.isfinite(torch.tensor(trainer.state.output[0]["loss_d"]))
    with pytest.raises(RuntimeError):  # a conditional step would feed 2 channels to this D
        PairedGANStep(d, torch.optim.Adam(d.parameters()), "ragan", conditional=True)(
            trainer, {"image": torch.rand(2, 1, 16, 16), "label": torch.rand(2, 1, 16, 16)}
        )


def test_conditional_d_refuses_inputs_on_another_grid():
    g = build("rcan", 2, "tiny", scale=2)
    d = build("patchgan_d", 2, "tiny", in_channels=2)
    step = PairedGANStep(d, torch.optim.Adam(d.parameters()), "vanilla", conditional=True)
    trainer = SupervisedTrainer(
        device=torch.device("cpu"),
        max_epochs=1,
        train_data_loader=[{"image": torch.rand(2, 1, 8, 8), "label": torch.rand(2, 1, 16, 16)}],
        network=g,
        optimizer=torch.optim.SGD(g.parameters(), lr=1e-3),
        loss_function=torch.nn.L1Loss(),
        iteration_update=step,
    )
    with pytest.raises(ValueError, match="conditional=False"):
        trainer.run()
