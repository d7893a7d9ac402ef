"""The paired-GAN training step: a conditional discriminator on (LR, HR) pairs.

MONAI has no trainer for this: its ``GanTrainer`` draws the generator input from noise, and its
``AdversarialTrainer`` shows the discriminator the *input* image as the real sample. This module is
the ``iteration_update`` of a MONAI ``SupervisedTrainer`` (which keeps the data loading, the
handlers, the checkpointing and the resume logic) for paired image-to-image GANs:

* pix2pix (Isola et al. 2017): D sees ``cat(LR, HR)`` vs ``cat(LR, G(LR))``, vanilla GAN loss,
  L1 content loss (weight 100), D loss halved;
* pix2pixHD (Wang et al. 2018): multi-scale D, LSGAN loss, feature matching over all D scales
  and layers (weight 10, each term ``4 / (n_layers + 1) / n_scales``);
* ESRGAN / R2-RCANGAN (Wang et al. 2018; the rat tibia study): relativistic average GAN loss
  (``D_ra(a, b) = C(a) - mean C(b)``), usually with an unconditional D on HR alone;
* hinge loss (Lim & Ye 2017, as in SAGAN/BigGAN) for completeness.

Order per iteration, as in pix2pix's reference code: G forward; D update on the detached fake;
G update with D frozen. The content loss is the trainer's ``loss_function`` (L1 for pix2pix).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from monai.engines.utils import IterationEvents
from torch import nn

GAN_LOSSES = ("vanilla", "lsgan", "hinge", "ragan")


def _scales(out) -> list[list[torch.Tensor]]:
    """D output as a list of scales, each a list of features whose last entry is the logit map.

    A plain D returns one tensor; pix2pixHD's multiscale D returns ``[[f1, ..., logits], ...]``.
    """
    if isinstance(out, torch.Tensor):
        return [[out]]
    return [list(s) if isinstance(s, (list, tuple)) else [s] for s in out]


def finish_iteration(engine):
    """Fire MONAI's iteration events as ``SupervisedTrainer`` does (handlers on
    FORWARD/LOSS/BACKWARD_COMPLETED run, and MODEL_COMPLETED decollates ``engine.state.output``
    for the other handlers); return the output."""
    for event in (
        IterationEvents.FORWARD_COMPLETED,
        IterationEvents.LOSS_COMPLETED,
        IterationEvents.BACKWARD_COMPLETED,
        IterationEvents.MODEL_COMPLETED,
    ):
        engine.fire_event(event)
    return engine.state.output


def _item(x) -> float:
    return float(x.detach()) if isinstance(x, torch.Tensor) else float(x)


def _target(pred: torch.Tensor, value: float) -> torch.Tensor:
    return torch.full_like(pred, value)


def d_loss(kind: str, real: list[list[torch.Tensor]], fake: list[list[torch.Tensor]]):
    """Discriminator loss, summed over scales, each ``0.5 * (real term + fake term)``."""
    total = 0.0
    for r_feats, f_feats in zip(real, fake, strict=True):
        r, f = r_feats[-1], f_feats[-1]
        if kind == "vanilla":
            lr_, lf = (
                F.binary_cross_entropy_with_logits(r, _target(r, 1.0)),
                F.binary_cross_entropy_with_logits(f, _target(f, 0.0)),
            )
        elif kind == "lsgan":
            lr_, lf = F.mse_loss(r, _target(r, 1.0)), F.mse_loss(f, _target(f, 0.0))
        elif kind == "hinge":
            lr_, lf = F.relu(1.0 - r).mean(), F.relu(1.0 + f).mean()
        elif kind == "ragan":
            lr_ = F.binary_cross_entropy_with_logits(r - f.mean(), _target(r, 1.0))
            lf = F.binary_cross_entropy_with_logits(f - r.mean(), _target(f, 0.0))
        else:
            raise ValueError(f"unknown GAN loss {kind!r}; choose from {GAN_LOSSES}")
        total = total + 0.5 * (lr_ + lf)
    return total


def g_adv_loss(kind: str, real: list[list[torch.Tensor]], fake: list[list[torch.Tensor]]):
    """Generator adversarial loss, summed over scales (``real`` is only used by ``ragan``)."""
    total = 0.0
    for r_feats, f_feats in zip(real, fake, strict=True):
        f = f_feats[-1]
        if kind == "vanilla":
            term = F.binary_cross_entropy_with_logits(f, _target(f, 1.0))
        elif kind == "lsgan":
            term = F.mse_loss(f, _target(f, 1.0))
        elif kind == "hinge":
            term = -f.mean()
        elif kind == "ragan":
            r = r_feats[-1].detach()
            term = 0.5 * (
                F.binary_cross_entropy_with_logits(r - f.mean(), _target(r, 0.0))
                + F.binary_cross_entropy_with_logits(f - r.mean(), _target(f, 1.0))
            )
        else:
            raise ValueError(f"unknown GAN loss {kind!r}; choose from {GAN_LOSSES}")
        total = total + term
    return total


def feature_matching(real: list[list[torch.Tensor]], fake: list[list[torch.Tensor]]):
    """pix2pixHD feature matching: L1 between D's intermediate features of real and fake,
    every layer but the logits, weighted ``4 / (n_layers + 1)`` per layer and ``1 / n_scales``
    per scale (``n_layers + 1`` = the number of intermediate features)."""
    total = 0.0
    for r_feats, f_feats in zip(real, fake, strict=True):
        n = len(f_feats) - 1
        if n < 1:
            raise ValueError("feature matching needs a discriminator that returns its features")
        for rf, ff in zip(r_feats[:-1], f_feats[:-1], strict=True):
            total = total + (4.0 / n) / len(fake) * F.l1_loss(ff, rf.detach())
    return total


class PairedGANStep:
    """``iteration_update`` for ``SupervisedTrainer``: one D step and one G step per batch.

    Args:
        discriminator: D; its input is ``cat(LR, image)`` along channels when ``conditional``
            (pix2pix, pix2pixHD), else the image alone (ESRGAN).
        d_optimizer: D's optimiser (the trainer's ``optimizer`` is G's).
        gan_loss: one of ``GAN_LOSSES``.
        weights: ``content`` (the trainer's loss function, e.g. L1), ``gan``, ``fm`` (feature
            matching; 0 disables it), ``perceptual`` (0 unless a ``perceptual`` loss is given).
        perceptual: a loss on (generated, HR), e.g. `bone3d.losses.perceptual.PerceptualLoss`
            (features of the in-project micro-CT regressor, in place of ImageNet VGG).

    Returns per iteration ``image``, ``label``, ``pred`` and the floats ``loss`` (G's total),
    ``loss_g_gan``, ``loss_g_content``, ``loss_g_fm``, ``loss_g_perceptual``, ``loss_d``,
    ``d_real``, ``d_fake`` (mean D
    logits of the last scale: D learns when they separate, G when ``d_fake`` climbs back).
    """

    def __init__(
        self,
        discriminator: nn.Module,
        d_optimizer: torch.optim.Optimizer,
        gan_loss: str = "vanilla",
        weights: dict | None = None,
        conditional: bool = True,
        perceptual: nn.Module | None = None,
    ):
        if gan_loss not in GAN_LOSSES:
            raise ValueError(f"unknown GAN loss {gan_loss!r}; choose from {GAN_LOSSES}")
        self.d = discriminator
        self.d_opt = d_optimizer
        self.kind = gan_loss
        default_p = 1.0 if perceptual is not None else 0.0
        self.w = {"content": 100.0, "gan": 1.0, "fm": 0.0, "perceptual": default_p,
                  **(weights or {})}  # fmt: skip
        if self.w["perceptual"] > 0 and perceptual is None:
            raise ValueError(
                "a perceptual weight needs a perceptual loss (bundles: --perceptual_net REG.pt, "
                "a regressor from bone3d fit-regressor)"
            )
        self.perceptual = perceptual
        self.conditional = conditional

    def _d_in(self, x: torch.Tensor, img: torch.Tensor) -> torch.Tensor:
        if not self.conditional:
            return img
        if x.shape[2:] != img.shape[2:]:
            raise ValueError(
                f"a conditional discriminator needs the input {tuple(x.shape[2:])} and the image "
                f"{tuple(img.shape[2:])} on one grid; post-upsampling generators need "
                "conditional=False (ESRGAN)"
            )
        return torch.cat([x, img], dim=1)

    def __call__(self, engine, batchdata) -> dict:
        x, y = engine.prepare_batch(batchdata, engine.state.device, engine.non_blocking)
        g = engine.network
        g.train()
        self.d.train()
        fake = g(x)

        # D step on the detached fake
        self.d.requires_grad_(True)
        self.d_opt.zero_grad(set_to_none=True)
        real_out = _scales(self.d(self._d_in(x, y)))
        fake_out = _scales(self.d(self._d_in(x, fake.detach())))
        loss_d = d_loss(self.kind, real_out, fake_out)
        loss_d.backward()
        self.d_opt.step()

        # G step with D frozen (its gradients still flow to G through the fake)
        self.d.requires_grad_(False)
        engine.optimizer.zero_grad(set_to_none=True)
        fake_out = _scales(self.d(self._d_in(x, fake)))
        real_out = _scales(self.d(self._d_in(x, y)))  # for ragan and feature matching
        loss_gan = g_adv_loss(self.kind, real_out, fake_out)
        loss_content = engine.loss_function(fake, y)
        loss_fm = feature_matching(real_out, fake_out) if self.w["fm"] > 0 else fake.new_zeros(())
        loss_p = (
            self.perceptual(fake, y)
            if self.perceptual is not None and self.w["perceptual"] > 0
            else fake.new_zeros(())
        )
        loss_g = (
            self.w["gan"] * loss_gan
            + self.w["content"] * loss_content
            + self.w["fm"] * loss_fm
            + self.w["perceptual"] * loss_p
        )
        loss_g.backward()
        engine.optimizer.step()
        self.d.requires_grad_(True)

        engine.state.output = {
            "image": x,
            "label": y,
            "pred": fake.detach(),
            "loss": loss_g.item(),
            "loss_g_gan": _item(loss_gan),
            "loss_g_content": _item(loss_content),
            "loss_g_fm": _item(loss_fm),
            "loss_g_perceptual": _item(loss_p),
            "loss_d": loss_d.item(),
            "d_real": float(real_out[-1][-1].detach().mean()),
            "d_fake": float(fake_out[-1][-1].detach().mean()),
        }
        return finish_iteration(engine)


def gan_losses(output) -> dict:
    """``output_transform`` for MLflow/TensorBoard handlers: the loss terms of an iteration
    (GAN, unpaired and DAN steps: whichever the step reports)."""
    item = output[0] if isinstance(output, list) else output
    keys = (
        "loss_g_gan", "loss_g_content", "loss_g_fm", "loss_g_perceptual", "loss_cycle",
        "loss_idt", "loss_d", "loss_d_a", "loss_d_b", "d_real", "d_fake", "loss_cls", "loss_rec",
        "loss_d_cls", "loss_gp", "loss_r1", "loss_sr", "loss_kernel", "loss_kernel_last",
    )  # fmt: skip
    return {f"train_{k}": float(item[k]) for k in keys if k in item}
