"""The CycleGAN training step: two generators, two discriminators, no paired supervision.

CycleGAN (Zhu, Park, Isola, Efros, ICCV 2017) learns LR -> HR (``G_AB``, the trainer's
``network``, used for validation and inference) and HR -> LR (``G_BA``) from samples of each
domain alone:

* adversarial terms with LSGAN loss for both directions (``D_B`` judges HR-domain images,
  ``D_A`` LR-domain ones);
* cycle consistency ``||G_BA(G_AB(a)) - a||_1 + ||G_AB(G_BA(b)) - b||_1`` (weight ``cycle``, 10);
* identity ``||G_AB(b) - b||_1 + ||G_BA(a) - a||_1`` (weight ``identity`` x ``cycle``, 0.5 x 10),
  only when both domains have the same number of channels (not for 2.5D slabs);
* discriminators updated on a history of 50 generated images (Shrivastava et al. 2017's image
  pool, as in the reference code), loss halved.

The batch is made unpaired: the HR patches are rolled by one along the batch, so no LR patch is
shown with its own HR counterpart (a CycleGAN has no term that compares them anyway). Order per
iteration, as in the reference code: both generators' step with both D frozen, then both D.
"""

from __future__ import annotations

import random

import torch
import torch.nn.functional as F
from torch import nn

from bone3d.engines.gan import _scales, d_loss, finish_iteration, g_adv_loss


class ImagePool:
    """History of generated images (Shrivastava et al. 2017; CycleGAN's ``ImagePool``): once
    full, each new image is, with probability 1/2, swapped for a stored one, which D sees
    instead. Hand-written: it is 20 lines in the reference code and in no maintained library."""

    def __init__(self, size: int = 50):
        self.size = int(size)
        self.images: list[torch.Tensor] = []

    def query(self, images: torch.Tensor) -> torch.Tensor:
        if self.size == 0:
            return images
        out = []
        for img in images.detach():
            img = img[None]
            if len(self.images) < self.size:
                self.images.append(img)
                out.append(img)
            elif random.random() > 0.5:
                i = random.randrange(self.size)
                out.append(self.images[i].clone())
                self.images[i] = img
            else:
                out.append(img)
        return torch.cat(out, 0)


class CycleGANStep:
    """``iteration_update`` for ``SupervisedTrainer`` (whose ``network`` is ``G_AB`` and whose
    ``optimizer`` covers ``G_AB`` and ``G_BA``).

    Args:
        g_ba: the HR -> LR generator.
        d_a, d_b: discriminators of the LR and the HR domain.
        d_optimizer: one optimiser over both discriminators.
        weights: ``gan`` (1), ``cycle`` (10), ``identity`` (0.5, relative to ``cycle``).
        pool_size: image-pool length (50; 0 disables the pool).
    """

    def __init__(
        self,
        g_ba: nn.Module,
        d_a: nn.Module,
        d_b: nn.Module,
        d_optimizer: torch.optim.Optimizer,
        weights: dict | None = None,
        pool_size: int = 50,
        gan_loss: str = "lsgan",
    ):
        self.g_ba, self.d_a, self.d_b = g_ba, d_a, d_b
        self.d_opt = d_optimizer
        self.w = {"gan": 1.0, "cycle": 10.0, "identity": 0.5, **(weights or {})}
        if gan_loss not in ("vanilla", "lsgan", "hinge"):
            raise ValueError(f"CycleGAN takes vanilla, lsgan or hinge losses, not {gan_loss!r}")
        self.kind = gan_loss
        self.pool_a, self.pool_b = ImagePool(pool_size), ImagePool(pool_size)

    def __call__(self, engine, batchdata) -> dict:
        a, b_paired = engine.prepare_batch(batchdata, engine.state.device, engine.non_blocking)
        b = torch.roll(b_paired, 1, dims=0)  # unpaired: no LR patch meets its own HR patch
        g_ab = engine.network
        for m in (g_ab, self.g_ba, self.d_a, self.d_b):
            m.train()

        # generators, both D frozen
        for d in (self.d_a, self.d_b):
            d.requires_grad_(False)
        engine.optimizer.zero_grad(set_to_none=True)
        fake_b = g_ab(a)
        fake_a = self.g_ba(b)
        judged_b, judged_a = _scales(self.d_b(fake_b)), _scales(self.d_a(fake_a))
        loss_gan = g_adv_loss(self.kind, judged_b, judged_b) + g_adv_loss(
            self.kind, judged_a, judged_a
        )  # (the 'real' argument is only read by ragan, refused here)
        loss_cycle = F.l1_loss(self.g_ba(fake_b), a) + F.l1_loss(g_ab(fake_a), b)
        if a.shape[1] == b.shape[1] and self.w["identity"] > 0:
            loss_idt = F.l1_loss(g_ab(b), b) + F.l1_loss(self.g_ba(a), a)
        else:
            loss_idt = a.new_zeros(())
        loss_g = (
            self.w["gan"] * loss_gan
            + self.w["cycle"] * loss_cycle
            + self.w["cycle"] * self.w["identity"] * loss_idt
        )
        loss_g.backward()
        engine.optimizer.step()

        # discriminators on real images and pooled fakes
        for d in (self.d_a, self.d_b):
            d.requires_grad_(True)
        self.d_opt.zero_grad(set_to_none=True)
        real_b, pooled_b = _scales(self.d_b(b)), _scales(self.d_b(self.pool_b.query(fake_b)))
        loss_d_b = d_loss(self.kind, real_b, pooled_b)
        loss_d_a = d_loss(
            self.kind, _scales(self.d_a(a)), _scales(self.d_a(self.pool_a.query(fake_a)))
        )
        (loss_d_a + loss_d_b).backward()
        self.d_opt.step()

        engine.state.output = {
            "image": a,
            "label": b_paired,
            "pred": fake_b.detach(),
            "loss": loss_g.item(),
            "loss_g_gan": float(loss_gan.detach()),
            "loss_cycle": float(loss_cycle.detach()),
            "loss_idt": float(loss_idt.detach()),
            "loss_d": float((loss_d_a + loss_d_b).detach()),
            "loss_d_a": loss_d_a.item(),
            "loss_d_b": loss_d_b.item(),
            "d_real": float(real_b[-1][-1].detach().mean()),
            "d_fake": float(pooled_b[-1][-1].detach().mean()),
        }
        return finish_iteration(engine)
