"""The DAN training step: every loop of the unfolded restorer/estimator alternation supervised.

DAN (Luo et al., NeurIPS 2020; greatlog/DAN ``blind_model.py``) unrolls ``loops`` alternations of
a restorer ``R(LR, code)`` and a kernel estimator ``E(SR, LR)``; each passes the other a detached
output, so the restorer learns only from the SR losses and the estimator only from the kernel
losses. The loss sums both over every loop:

    sum_i  w_sr * loss(SR_i, HR) + w_kernel * ||code_i - code_true||_1

``loss`` is the trainer's ``loss_function`` (L1 in the reference); ``code_true`` is the batch's
``kernel_code`` (`bone3d.data.simulate.kernel_code`: PSF FWHM per axis in LR voxels and the noise
SD, recorded by ``bone3d prepare`` for every simulated pair). Pairs without a recorded degradation
(real registered scans) cannot train the estimator, and the step says so.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from bone3d.engines.gan import finish_iteration


class DANStep:
    """``iteration_update`` for ``SupervisedTrainer`` whose ``network`` is a
    `bone3d.nets.dan.DANSR` (or a ``DistributedDataParallel`` around one).

    Args:
        weights: ``sr`` (1) and ``kernel`` (1), per loop.

    Returns per iteration ``image``, ``label``, ``pred`` (the last loop's SR) and the floats
    ``loss``, ``loss_sr`` and ``loss_kernel`` (both summed over loops) and ``loss_kernel_last``
    (the last loop's kernel error: the estimator learns when it falls).
    """

    def __init__(self, weights: dict | None = None):
        self.w = {"sr": 1.0, "kernel": 1.0, **(weights or {})}

    def __call__(self, engine, batchdata) -> dict:
        x, y = engine.prepare_batch(batchdata, engine.state.device, engine.non_blocking)
        code = batchdata.get("kernel_code") if isinstance(batchdata, dict) else None
        if code is None:
            raise ValueError(
                "DAN trains its kernel estimator on the degradation of each pair: the datalist "
                "needs degradation.json beside every LR volume (bone3d prepare writes it for "
                "simulated pairs; real registered pairs have none)"
            )
        code = torch.as_tensor(code).to(device=x.device, dtype=x.dtype)
        net = engine.network
        net.train()
        engine.optimizer.zero_grad(set_to_none=True)
        srs, codes = net(x, all_loops=True)
        if codes[0].shape[1] != code.shape[1]:
            raise ValueError(
                f"the network estimates {codes[0].shape[1]} kernel parameters, the data "
                f"records {code.shape[1]}: build DAN with input_para={code.shape[1]}"
            )
        loss_sr = sum(engine.loss_function(sr, y) for sr in srs)
        loss_kernel = sum(F.l1_loss(c, code) for c in codes)
        loss = self.w["sr"] * loss_sr + self.w["kernel"] * loss_kernel
        loss.backward()
        engine.optimizer.step()
        engine.state.output = {
            "image": x,
            "label": y,
            "pred": srs[-1].detach(),
            "loss": loss.item(),
            "loss_sr": float(loss_sr.detach()),
            "loss_kernel": float(loss_kernel.detach()),
            "loss_kernel_last": float(F.l1_loss(codes[-1].detach(), code)),
        }
        return finish_iteration(engine)
