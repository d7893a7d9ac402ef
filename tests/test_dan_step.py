"""DAN's training step (`bone3d.engines.dan`) and the kernel code it learns
(`bone3d.data.simulate.kernel_code`)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.engines import SupervisedTrainer

from bone3d.data.simulate import degrade, get_preset, kernel_code
from bone3d.engines.dan import DANStep
from bone3d.errors import InputError
from bone3d.io import make_image
from bone3d.nets import build

CODE = [1.5, 1.5, 2.0, 0.05]


def _data(n_batches=1, code=CODE, seed=0):
    g = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(n_batches):
        hr = torch.rand(2, 1, 16, 16, generator=g)
        lr = torch.nn.functional.avg_pool2d(hr, 2)
        item = {"image": lr, "label": hr}
        if code is not None:
            item["kernel_code"] = torch.tensor([code, code])
        batches.append(item)
    return batches


def _train(net, data, weights=None, epochs=1, lr=1e-3):
    trainer = SupervisedTrainer(
        device=torch.device("cpu"),
        max_epochs=epochs,
        train_data_loader=data,
        network=net,
        optimizer=torch.optim.Adam(net.parameters(), lr),
        loss_function=torch.nn.L1Loss(),
        iteration_update=DANStep(weights),
        prepare_batch=lambda b, device, non_blocking, **kw: (b["image"], b["label"]),
    )
    trainer.run()
    return trainer.state.output[0]


def _dan(seed=0):
    torch.manual_seed(seed)
    return build("dan", 2, "tiny", scale=2)


def test_each_part_learns_from_its_own_loss_only():
    """The alternation passes detached outputs: with the kernel weight 0 the estimator does not
    move; with the SR weight 0 the restorer does not (Adam's step is 0 for a zero gradient)."""
    for weights, frozen, moving in (
        ({"kernel": 0.0}, "estimator", "restorer"),
        ({"sr": 0.0}, "restorer", "estimator"),
    ):
        net = _dan()
        before = {k: v.clone() for k, v in net.state_dict().items()}
        _train(net, _data(), weights)
        after = net.state_dict()
        assert all(torch.equal(before[k], after[k]) for k in before if k.startswith(frozen))
        assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith(moving))


def test_losses_sum_every_loop_and_the_estimator_learns_the_code():
    net = _dan()
    with torch.no_grad():
        srs, codes = net(_data()[0]["image"], all_loops=True)
    assert len(srs) == len(codes) == net.loops == 2
    first = _train(net, _data())
    expected_sr = sum(float(torch.nn.functional.l1_loss(s, _data()[0]["label"])) for s in srs)
    assert first["loss_sr"] == pytest.approx(expected_sr, rel=1e-5)
    last = _train(net, _data(20), epochs=3)
    assert last["loss_kernel_last"] < 0.25 * first["loss_kernel_last"]
    assert np.isfinite(last["loss"])


def test_refuses_data_without_kernel_codes_and_mismatched_code_lengths():
    with pytest.raises(ValueError, match="degradation.json"):
        _train(_dan(), _data(code=None))
    with pytest.raises(ValueError, match="input_para=3"):
        _train(_dan(), _data(code=[1.0, 1.0, 0.1]))


def test_kernel_code_of_a_simulated_scan():
    """PSF FWHM per axis in LR voxels and the noise SD as a fraction of the LR window, from the
    record `degrade` writes (degradation.json)."""
    hr = make_image(np.full((40, 40, 40), 500.0, np.float32), spacing=(0.05,) * 3)
    d = degrade(hr, get_preset("mdct"), seed=0)
    code = kernel_code(d.record(), [-300.0, 1700.0])
    p = d.preset
    expected = [f / s for f, s in zip(d.effective_fwhm_mm, d.record()["spacing_mm"], strict=True)]
    np.testing.assert_allclose(code[:3], expected)
    assert code[3] == pytest.approx(d.noise_sd_hu / 2000.0)
    assert p.name == "mdct" and all(c > 0 for c in code[:3])
    with pytest.raises(InputError, match="LR window"):
        kernel_code(d.record(), [5.0, 5.0])


def test_training_subjects_carry_the_kernel_code_of_their_pair(tmp_path):
    import json

    from bone3d.data.datalist import datalist_meta
    from bone3d.data.patches import load_subjects
    from bone3d.data.prepare import prepare

    dl = prepare(tmp_path, phantoms=3, preset="mdct", phantom_shape=(32, 32, 32), progress=False)
    (subject,) = load_subjects(str(dl), "training")
    record = json.loads((tmp_path / subject["specimen"] / "degradation.json").read_text())
    expected = kernel_code(record, datalist_meta(dl)["lr_range"])
    np.testing.assert_allclose(subject["kernel_code"].numpy(), expected, rtol=1e-6)


def test_psf_jitter_varies_the_blur_over_specimens(tmp_path):
    """``prepare(psf_jitter=j)``: every specimen's FWHM lies within (1 +- j) x the preset's, they
    differ, and their kernel codes follow; a jitter of 1 or more is refused."""
    import json

    from bone3d.data.prepare import prepare

    preset = get_preset("mdct")
    dl = prepare(tmp_path / "d", phantoms=4, preset="mdct", phantom_shape=(24, 24, 24),
                 progress=False, psf_jitter=0.3)  # fmt: skip
    assert json.loads(dl.read_text())["psf_jitter"] == 0.3
    fwhms = []
    for folder in sorted((tmp_path / "d").glob("phantom*")):
        record = json.loads((folder / "degradation.json").read_text())
        ratio = np.asarray(record["preset"]["psf_fwhm_mm"]) / np.asarray(preset.psf_fwhm_mm)
        assert np.all((ratio >= 0.7) & (ratio <= 1.3))
        fwhms.append(tuple(record["effective_fwhm_mm"]))
    assert len(set(fwhms)) == 4
    with pytest.raises(InputError, match="psf_jitter"):
        prepare(tmp_path / "e", phantoms=3, psf_jitter=1.0, progress=False)
