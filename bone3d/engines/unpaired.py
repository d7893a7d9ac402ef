"""Unpaired training steps: CycleGAN, StarGAN and FUNIT (no term compares an LR patch with its
own HR patch).

The CycleGAN step: two generators, two discriminators.

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

`StarGANStep` and `FUNITStep` train one generator for both directions between the two domains
(0 = LR CT on the HR grid, 1 = micro-CT); see their docstrings. Both see the two domains with the
same shape, so a 2.5D slab of LR slices is translated to a slab of micro-CT slices.
"""

from __future__ import annotations

import random

import torch
import torch.nn.functional as F
from torch import nn

from bone3d.data.patches import prepare_batch
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

    def state_dict(self) -> dict:
        return {"size": self.size, "images": list(self.images)}

    def load_state_dict(self, state: dict) -> None:
        self.size = int(state["size"])
        self.images = [t.clone() for t in state["images"]]


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

    def state_dict(self) -> dict:
        """The image pools: checkpointed with the networks, so a resumed training shows D the
        same history as an uninterrupted one."""
        return {"pool_a": self.pool_a.state_dict(), "pool_b": self.pool_b.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.pool_a.load_state_dict(state["pool_a"])
        self.pool_b.load_state_dict(state["pool_b"])

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


def domain_batch(engine, batchdata, slab: int | None):
    """``(a, b)``: LR patches (on the HR grid) and their HR patches, with the same shape.

    3D: ``(B, 1, X, Y, Z)`` each. 2D / 2.5D (``slab=k``, patch depth 2k+1): both become slabs
    ``(B, 2k+1, X, Y)``, the HR slices as channels too, so one generator maps either domain to
    the other (the trainer's ``SlabBatch`` would keep only the HR centre slice).
    """
    a, b = prepare_batch(batchdata, engine.state.device, engine.non_blocking)
    if b is None:
        raise ValueError("unpaired training needs target-domain (micro-CT) patches")
    if slab is not None:
        if a.shape[-1] != 2 * slab + 1:
            raise ValueError(f"patch depth {a.shape[-1]} != 2 * slab + 1 = {2 * slab + 1}")
        a, b = a[:, 0].permute(0, 3, 1, 2), b[:, 0].permute(0, 3, 1, 2)
    return a, b


class GradientSync:
    """Data-parallel training without ``DistributedDataParallel`` for the StarGAN and FUNIT steps:
    parameters broadcast from rank 0 once, gradients averaged over ranks after each backward.

    Hand-written because DDP cannot wrap these steps: one generator runs several forwards (with
    different conditioning) before one backward, and the gradient penalties differentiate D
    twice, which DDP's reducer does not support. Without ``torch.distributed`` it does nothing.
    """

    def __init__(self):
        self.broadcast_done = False

    @staticmethod
    def _world() -> int:
        import torch.distributed as dist

        return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1

    def broadcast(self, *modules: nn.Module) -> None:
        if self.broadcast_done or self._world() == 1:
            self.broadcast_done = True
            return
        import torch.distributed as dist

        for m in modules:
            for t in list(m.parameters()) + list(m.buffers()):
                dist.broadcast(t.data, 0)
        self.broadcast_done = True

    def average(self, module: nn.Module) -> None:
        world = self._world()
        if world == 1:
            return
        import torch.distributed as dist

        for p in module.parameters():
            if p.grad is not None:
                dist.all_reduce(p.grad)
                p.grad /= world


def _centre(x: torch.Tensor, slab: int | None) -> torch.Tensor:
    return x if slab is None else x[:, slab : slab + 1]


class StarGANStep:
    """StarGAN (Choi et al., CVPR 2018; yunjey/stargan ``solver.py``) between two domains, as
    ``iteration_update`` for a ``SupervisedTrainer`` whose ``network`` is a
    `bone3d.nets.stargan.StarGANTranslator` (its ``generator`` is trained; ``optimizer`` is G's).

    Each iteration takes the batch's LR patches (domain 0) and its HR patches rolled by one along
    the batch (domain 1, unpaired), each to be translated to the other domain:

    * D: WGAN-GP, ``-D(real) + D(G(x, c_trg)) + lambda_gp * GP`` (gradient penalty on random
      interpolates, Gulrajani et al. 2017) ``+ lambda_cls * CE(D_cls(real), c_org)``;
    * G, every ``n_critic``-th iteration (by the engine's iteration count, so resume keeps the
      rhythm): ``-D(G(x, c_trg)) + lambda_cls * CE(D_cls(G(x, c_trg)), c_trg) + lambda_rec *
      ||G(G(x, c_trg), c_org) - x||_1``.

    Weights (reference defaults): ``cls`` 1, ``rec`` 10, ``gp`` 10; ``n_critic`` 5. ``loss`` is
    G's latest total (evaluated without a step before G's first update).
    """

    def __init__(
        self,
        discriminator: nn.Module,
        d_optimizer: torch.optim.Optimizer,
        weights: dict | None = None,
        n_critic: int = 5,
        slab: int | None = None,
    ):
        self.d, self.d_opt = discriminator, d_optimizer
        self.w = {"cls": 1.0, "rec": 10.0, "gp": 10.0, **(weights or {})}
        self.n_critic = int(n_critic)
        if self.n_critic < 1:
            raise ValueError("n_critic must be >= 1")
        self.slab = slab
        self.last_g: dict | None = None
        self.sync = GradientSync()

    @staticmethod
    def _onehot(labels: torch.Tensor, c_dim: int, dtype) -> torch.Tensor:
        return F.one_hot(labels, c_dim).to(dtype)

    def _gradient_penalty(self, real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
        alpha = torch.rand([real.shape[0]] + [1] * (real.dim() - 1), device=real.device)
        x_hat = (alpha * real + (1 - alpha) * fake).requires_grad_(True)
        out, _ = self.d(x_hat)
        (grad,) = torch.autograd.grad(out, x_hat, torch.ones_like(out), create_graph=True)
        return ((grad.flatten(1).norm(2, dim=1) - 1) ** 2).mean()

    def _g_terms(self, g, x, c_org, c_trg, org, trg) -> dict:
        fake = g(x, c_trg)
        src, cls = self.d(fake)
        adv = -src.mean()
        cls_loss = F.cross_entropy(cls, trg)
        rec = F.l1_loss(g(fake, c_org), x)
        total = adv + self.w["cls"] * cls_loss + self.w["rec"] * rec
        return {"total": total, "adv": adv, "cls": cls_loss, "rec": rec}

    def __call__(self, engine, batchdata) -> dict:
        a, b_paired = domain_batch(engine, batchdata, self.slab)
        b = torch.roll(b_paired, 1, dims=0)
        translator = engine.network
        g, c_dim = translator.generator, translator.c_dim
        g.train()
        self.d.train()
        self.sync.broadcast(translator, self.d)
        n = a.shape[0]
        x = torch.cat([a, b], 0)
        org = torch.cat([a.new_zeros(n, dtype=torch.long), a.new_ones(n, dtype=torch.long)])
        trg = 1 - org
        c_org, c_trg = self._onehot(org, c_dim, x.dtype), self._onehot(trg, c_dim, x.dtype)

        # D: real, fake, gradient penalty, domain classification of real images
        self.d.requires_grad_(True)
        self.d_opt.zero_grad(set_to_none=True)
        src_real, cls_real = self.d(x)
        with torch.no_grad():
            fake = g(x, c_trg)
        src_fake, _ = self.d(fake)
        loss_real, loss_fake = -src_real.mean(), src_fake.mean()
        loss_cls_d = F.cross_entropy(cls_real, org)
        loss_gp = self._gradient_penalty(x, fake)
        loss_d = loss_real + loss_fake + self.w["cls"] * loss_cls_d + self.w["gp"] * loss_gp
        loss_d.backward()
        self.sync.average(self.d)
        self.d_opt.step()

        # G every n_critic iterations, D frozen
        self.d.requires_grad_(False)
        if int(engine.state.iteration) % self.n_critic == 0:
            engine.optimizer.zero_grad(set_to_none=True)
            terms = self._g_terms(g, x, c_org, c_trg, org, trg)
            terms["total"].backward()
            self.sync.average(g)
            engine.optimizer.step()
            self.last_g = {k: float(v.detach()) for k, v in terms.items()}
        elif self.last_g is None:
            with torch.no_grad():
                terms = self._g_terms(g, x, c_org, c_trg, org, trg)
            self.last_g = {k: float(v) for k, v in terms.items()}
        self.d.requires_grad_(True)

        with torch.no_grad():
            pred = _centre(fake[:n], self.slab)
        engine.state.output = {
            "image": a,
            "label": _centre(b_paired, self.slab),
            "pred": pred,
            "loss": self.last_g["total"],
            "loss_g_gan": self.last_g["adv"],
            "loss_cls": self.last_g["cls"],
            "loss_rec": self.last_g["rec"],
            "loss_d": loss_d.item(),
            "loss_d_cls": loss_cls_d.item(),
            "loss_gp": loss_gp.item(),
            "d_real": float(src_real.detach().mean()),
            "d_fake": float(src_fake.detach().mean()),
        }
        return finish_iteration(engine)


class FUNITStep:
    """FUNIT (Liu et al., ICCV 2019; NVlabs/FUNIT ``funit_model.py``) between two classes, as
    ``iteration_update`` for a ``SupervisedTrainer`` whose ``network`` is a
    `bone3d.nets.funit.FUNITTranslator` (its ``generator`` is trained; ``optimizer`` is G's).

    Content images ``x_a`` are the batch's LR patches (class 0) and HR patches (class 1); class
    images ``x_b`` are the other class's patches, rolled by one along the batch (unpaired).
    Per iteration, as in the reference: D step, then G step.

    * D: hinge loss on real class images (``relu(1 - D(x_b, l_b))``) and on translations
      (``relu(1 + D(x_t, l_b))``), plus the R1 gradient penalty ``10 * sum |dD(x_b)/dx_b|^2 / B``
      (Mescheder et al. 2018);
    * G: ``gan * 0.5 (adv(x_t, l_b) + adv(x_r, l_a)) + r * ||x_r - x_a||_1 + fm * (|f(x_r) -
      f(x_a)|_1 + |f(x_t) - f(x_b)|_1)``, with ``x_t = dec(content(x_a), class(x_b))`` the
      translation, ``x_r = dec(content(x_a), class(x_a))`` the reconstruction and ``f`` D's
      features averaged over space (feature matching).

    Weights (reference ``funit_animals.yaml``): ``gan`` 1, ``r`` 0.1, ``fm`` 1, ``r1`` 10. After
    each G step the translator's moving-average generator is updated (``update_test``, the
    reference's ``gen_test``), and its class codes of the batch's micro-CT images update the
    translator's stored code.
    """

    def __init__(
        self,
        discriminator: nn.Module,
        d_optimizer: torch.optim.Optimizer,
        weights: dict | None = None,
        slab: int | None = None,
    ):
        self.d, self.d_opt = discriminator, d_optimizer
        self.w = {"gan": 1.0, "r": 0.1, "fm": 1.0, "r1": 10.0, **(weights or {})}
        self.slab = slab
        self.sync = GradientSync()

    @staticmethod
    def _pooled(feat: torch.Tensor) -> torch.Tensor:
        return feat.flatten(2).mean(2)

    def __call__(self, engine, batchdata) -> dict:
        a, b_paired = domain_batch(engine, batchdata, self.slab)
        translator = engine.network
        g = translator.generator
        g.train()
        self.d.train()
        self.sync.broadcast(translator, self.d)
        n = a.shape[0]
        xa = torch.cat([a, b_paired], 0)
        la = torch.cat([a.new_zeros(n, dtype=torch.long), a.new_ones(n, dtype=torch.long)])
        xb = torch.cat([torch.roll(b_paired, 1, dims=0), torch.roll(a, 1, dims=0)], 0)
        lb = 1 - la

        # D: hinge on real class images with R1, hinge on translations
        self.d.requires_grad_(True)
        self.d_opt.zero_grad(set_to_none=True)
        xb_req = xb.detach().clone().requires_grad_(True)
        resp_real, _ = self.d(xb_req, lb)
        loss_real = F.relu(1.0 - resp_real).mean()
        (grad,) = torch.autograd.grad(resp_real.mean(), xb_req, create_graph=True)
        loss_r1 = grad.pow(2).sum() / xb.shape[0]
        with torch.no_grad():
            xt = g.decode(g.enc_content(xa), g.class_code(xb))
        resp_fake, _ = self.d(xt, lb)
        loss_fake = F.relu(1.0 + resp_fake).mean()
        loss_d = self.w["gan"] * (loss_real + loss_fake) + self.w["r1"] * loss_r1
        loss_d.backward()
        self.sync.average(self.d)
        self.d_opt.step()

        # G with D frozen
        self.d.requires_grad_(False)
        engine.optimizer.zero_grad(set_to_none=True)
        content = g.enc_content(xa)
        s_xa, s_xb = g.class_code(xa), g.class_code(xb)
        xt = g.decode(content, s_xb)
        xr = g.decode(content, s_xa)
        resp_t, feat_t = self.d(xt, lb)
        resp_r, feat_r = self.d(xr, la)
        with torch.no_grad():
            _, feat_b = self.d(xb, lb)
            _, feat_a = self.d(xa, la)
        loss_adv = 0.5 * (-resp_t.mean() - resp_r.mean())
        loss_rec = F.l1_loss(xr, xa)
        loss_fm = F.l1_loss(self._pooled(feat_r), self._pooled(feat_a)) + F.l1_loss(
            self._pooled(feat_t), self._pooled(feat_b)
        )
        loss_g = self.w["gan"] * loss_adv + self.w["r"] * loss_rec + self.w["fm"] * loss_fm
        loss_g.backward()
        self.sync.average(g)
        engine.optimizer.step()
        self.d.requires_grad_(True)
        translator.update_test()  # the moving average that translates at test time
        with torch.no_grad():  # micro-CT class codes, by the averaged class encoder
            translator.update_class_code(translator.generator_test.class_code(xb[lb == 1]))

        engine.state.output = {
            "image": a,
            "label": _centre(b_paired, self.slab),
            "pred": _centre(xt[:n].detach(), self.slab),
            "loss": loss_g.item(),
            "loss_g_gan": loss_adv.item(),
            "loss_rec": loss_rec.item(),
            "loss_g_fm": loss_fm.item(),
            "loss_d": loss_d.item(),
            "loss_r1": loss_r1.item(),
            "d_real": float(resp_real.detach().mean()),
            "d_fake": float(resp_fake.detach().mean()),
        }
        return finish_iteration(engine)
