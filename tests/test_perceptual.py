"""The in-project perceptual loss (`bone3d.losses.perceptual`) and its use by the paired-GAN
step and bundles."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from monai.engines import SupervisedTrainer

from bone3d.engines.gan import PairedGANStep
from bone3d.losses.perceptual import PerceptualLoss
from bone3d.losses.regressor import MorphometryRegressor, save_regressor
from bone3d.nets import build

ROOT = Path(__file__).resolve().parents[1]


def _regressor(dims=2):
    torch.manual_seed(0)
    return MorphometryRegressor(dims, channels=(4, 8, 8))


def test_zero_for_equal_images_positive_otherwise_and_frozen():
    loss = PerceptualLoss(_regressor())
    x = torch.rand(2, 3, 16, 16)  # 2.5D output: channels are separate images
    assert float(loss(x, x)) == 0.0
    pred = torch.rand(2, 3, 16, 16, requires_grad=True)
    value = loss(pred, x)
    value.backward()
    assert float(value.detach()) > 0 and pred.grad is not None and pred.grad.abs().sum() > 0
    assert all(not p.requires_grad for p in loss.regressor.parameters())


def test_value_is_the_sum_of_l1_feature_distances_over_the_chosen_blocks():
    reg = _regressor(3)
    pred, target = torch.rand(1, 1, 12, 12, 12), torch.rand(1, 1, 12, 12, 12)
    expected, a, b = 0.0, pred, target
    for i, block in enumerate(reg.features):
        a, b = block(a), block(b)
        if i in (0, 2):
            expected += float((a - b).abs().mean())
    got = float(PerceptualLoss(reg, layers=[0, 2])(pred, target))
    assert got == pytest.approx(expected, rel=1e-5)


def test_refuses_bad_layers_and_shapes(tmp_path):
    with pytest.raises(ValueError, match="blocks"):
        PerceptualLoss(_regressor(), layers=[7])
    path = save_regressor(_regressor(3), tmp_path / "reg.pt", {})
    with pytest.raises(ValueError, match="3D feature extractor"):
        PerceptualLoss(path)(torch.rand(1, 1, 8, 8), torch.rand(1, 1, 8, 8))


def test_paired_gan_step_adds_the_weighted_perceptual_term():
    torch.manual_seed(0)
    g = build("unet", 2, "tiny")
    d = build("patchgan_d", 2, "tiny", in_channels=2)
    perceptual = PerceptualLoss(_regressor())
    step = PairedGANStep(
        d, torch.optim.SGD(d.parameters(), lr=0.0), "lsgan",
        {"content": 0.0, "gan": 0.0, "perceptual": 2.0}, perceptual=perceptual,
    )  # fmt: skip
    data = [{"image": torch.rand(2, 1, 16, 16), "label": torch.rand(2, 1, 16, 16)}]
    with torch.no_grad():
        expected = float(perceptual(g.train()(data[0]["image"]), data[0]["label"]))
    trainer = SupervisedTrainer(
        device=torch.device("cpu"), max_epochs=1, train_data_loader=data, network=g,
        optimizer=torch.optim.SGD(g.parameters(), lr=0.0), loss_function=torch.nn.L1Loss(),
        iteration_update=step,
    )  # fmt: skip
    trainer.run()
    out = trainer.state.output[0]
    assert out["loss_g_perceptual"] == pytest.approx(expected, rel=1e-5)
    assert out["loss"] == pytest.approx(2.0 * expected, rel=1e-5)
    with pytest.raises(ValueError, match="perceptual"):
        PairedGANStep(d, torch.optim.SGD(d.parameters(), lr=0.1), weights={"perceptual": 1.0})


@pytest.mark.parametrize("bundle", ["esrgan", "pix2pixhd"])
def test_gan_bundles_build_the_perceptual_loss_from_a_regressor_file(bundle, tmp_path):
    """``--perceptual_net REG.pt`` in a paired-GAN bundle gives its step a `PerceptualLoss` on
    that file; without it the step has none."""
    from monai.bundle import ConfigParser

    from bone3d.engines import bundle_configs

    reg = save_regressor(_regressor(3), tmp_path / "reg.pt", {})
    meta = {"lr_range": [0, 1], "hr_range": [0, 1], "hr_spacing_mm": [0.05] * 3}
    datalist = tmp_path / "datalist.json"
    datalist.write_text(json.dumps({**meta, "training": [], "validation": [], "test": []}))
    for net, kind in ((None, type(None)), (str(reg), PerceptualLoss)):
        parser = ConfigParser()
        parser.read_config(bundle_configs(ROOT / "bundles" / bundle, "train", "3d"))
        parser["bundle_root"] = str(ROOT / "bundles" / bundle)
        parser["datalist"] = str(datalist)
        parser["net_preset"] = "tiny"
        parser["perceptual_net"] = net
        assert isinstance(parser.get_parsed_content("gan_step").perceptual, kind)
