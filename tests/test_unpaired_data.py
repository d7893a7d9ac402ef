"""Unpaired training data (`bone3d.data.patches.unpaired_loader`): one TorchIO queue per domain,
one-sided datalist entries, and real clinical CT against real micro-CT."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from bone3d.data.patches import patch_loader, unpaired_loader
from bone3d.data.prepare import prepare
from bone3d.errors import InputError
from bone3d.io import make_image, read_volume, write_volume


@pytest.fixture(scope="module")
def one_sided(tmp_path_factory):
    """A phantom datalist whose first training entry keeps only its LR scan and second only
    its micro-CT (a patient without micro-CT, a micro-CT without a scan)."""
    dl = prepare(
        tmp_path_factory.mktemp("unpaired"), phantoms=5, preset="hrpqct",
        phantom_shape=(32, 32, 32), progress=False,
    )  # fmt: skip
    data = json.loads(Path(dl).read_text())
    first, second = data["training"][0], data["training"][1]
    data["training"][0] = {"specimen": "scan_only", "image": first["image"]}
    data["training"][1] = {"specimen": "uct_only", "target": second["target"]}
    Path(dl).write_text(json.dumps(data))
    return str(dl)


def test_paired_loader_refuses_one_sided_entries(one_sided):
    with pytest.raises(InputError, match="unpaired_loader"):
        patch_loader(one_sided, patch_size=[16, 16, 16])


def test_domains_come_from_their_own_volumes(one_sided):
    loader = unpaired_loader(
        one_sided, patch_size=[16, 16, 16], samples_per_volume=4, queue_length=8, batch_size=2
    )
    lr_from, hr_from = set(), set()
    for batch in loader:
        assert batch["image"]["data"].shape == batch["target"]["data"].shape == (2, 1, 16, 16, 16)
        lr_from |= set(batch["specimen"])
        hr_from |= set(batch["target_specimen"])
    assert "scan_only" in lr_from and "uct_only" not in lr_from
    assert "uct_only" in hr_from and "scan_only" not in hr_from
    assert len(loader.dataset) == 2 * 4  # two volumes per domain, 4 patches each


def test_unpaired_loader_refuses_post_upsampling_and_a_missing_domain(one_sided, tmp_path):
    with pytest.raises(ValueError, match="pre-upsampled"):
        unpaired_loader(one_sided, patch_size=[16, 16, 16], scale=2)
    data = json.loads(Path(one_sided).read_text())
    data["training"] = [{"specimen": e["specimen"], "image": e["image"]}
                        for e in data["training"] if "image" in e]  # fmt: skip
    for e in data["training"]:
        e["image"] = str((Path(one_sided).parent / e["image"]).resolve())
    (tmp_path / "datalist.json").write_text(json.dumps(data))
    with pytest.raises(InputError, match="HR"):
        unpaired_loader(str(tmp_path / "datalist.json"), patch_size=[16, 16, 16])


@pytest.mark.realdata
def test_real_clinical_ct_against_real_micro_ct(shared_data, tmp_path):
    """The LR domain is a crop of the real clinical CT of the lower legs (0.84 x 0.84 x 3 mm,
    HU) around the tibia; the HR domain the real LHDL micro-CT core (19.5 um), which the
    loader resamples (anti-aliased) to the 0.1 mm model grid. A StarGAN step trains on them."""
    from monai.engines import SupervisedTrainer
    from scipy import ndimage as ndi

    from bone3d.engines.unpaired import StarGANStep
    from bone3d.nets import build

    ct = read_volume(
        shared_data / "bonelab_clinical_ct_lower_legs" / "bonelab_ct_lower_legs_HU.nii.gz"
    )
    hu = ct.data[0].numpy()
    z = hu.shape[2] // 2
    labels, n = ndi.label(hu[:, :, z] > 700)
    largest = 1 + int(np.argmax(ndi.sum(np.ones_like(labels), labels, range(1, n + 1))))
    cx, cy = (int(round(c)) for c in ndi.center_of_mass(labels == largest))
    crop = hu[cx - 4 : cx + 4, cy - 4 : cy + 4, z - 1 : z + 1].astype(np.float32)
    write_volume(make_image(crop, spacing=ct.spacing), tmp_path / "mdct.nii.gz")
    lhdl = shared_data / "lhdl_human_trabecular_uct" / "LHDL_3155_D_4_bc_200cube_19p5um.nii.gz"
    grey = read_volume(lhdl).data.numpy()
    lo, hi = (float(v) for v in np.percentile(grey, [5, 95]))
    datalist = tmp_path / "datalist.json"
    datalist.write_text(json.dumps({
        "name": "real-unpaired", "hr_spacing_mm": [0.1, 0.1, 0.1], "lr_range": [-200.0, 1600.0],
        "hr_range": [lo, hi], "validation": [], "test": [],
        "training": [{"specimen": "legs", "image": "mdct.nii.gz"},
                     {"specimen": "lhdl", "target": str(lhdl)}],
    }))  # fmt: skip
    loader = unpaired_loader(
        str(datalist), patch_size=[24, 24, 24], samples_per_volume=2, queue_length=4, batch_size=2
    )
    batch = next(iter(loader))
    lr, hr = batch["image"]["data"], batch["target"]["data"]
    assert lr.shape == hr.shape == (2, 1, 24, 24, 24)
    assert set(batch["specimen"]) == {"legs"} and set(batch["target_specimen"]) == {"lhdl"}
    assert torch.isfinite(lr).all() and torch.isfinite(hr).all()
    assert float(hr.std()) > float(lr.std())  # micro-CT texture vs smooth clinical CT

    torch.manual_seed(0)
    g = build("stargan", 3, "tiny")
    d = build("stargan_d", 3, "tiny", image_size=24, c_dim=2)
    step = StarGANStep(d, torch.optim.Adam(d.parameters(), 1e-4), n_critic=1)
    trainer = SupervisedTrainer(
        device=torch.device("cpu"), max_epochs=1, train_data_loader=loader, network=g,
        optimizer=torch.optim.Adam(g.parameters(), 1e-4), loss_function=torch.nn.L1Loss(),
        iteration_update=step,
    )  # fmt: skip
    trainer.run()
    out = trainer.state.output[0]
    assert all(np.isfinite(out[k]) for k in ("loss", "loss_d", "loss_rec", "loss_d_cls"))
