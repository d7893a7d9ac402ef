"""Image metrics against scikit-image's independent implementations, and the evaluate report."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess

import numpy as np
import pytest
import torch
import torchio as tio
from scipy import ndimage as ndi
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from bone3d.data.phantom import make_phantom
from bone3d.data.simulate import degrade
from bone3d.errors import InputError
from bone3d.evaluation.image import image_metrics, psnr, ssim
from bone3d.evaluation.report import evaluate, sub_vois


@pytest.fixture(scope="module")
def pair():
    rng = np.random.default_rng(0)
    ref = ndi.gaussian_filter(rng.random((40, 36, 30)), 2).astype(np.float32)
    pred = (ref + rng.normal(0, 0.02, ref.shape)).astype(np.float32)
    return pred, ref


def test_psnr_and_ssim_match_scikit_image(pair):
    pred, ref = pair
    assert psnr(pred, ref, 1.0) == pytest.approx(
        peak_signal_noise_ratio(ref, pred, data_range=1.0), abs=1e-3
    )
    sk = structural_similarity(
        ref, pred, data_range=1.0, gaussian_weights=True, sigma=1.5, use_sample_covariance=False
    )
    # scikit-image averages its map over the image minus a (win-1)/2 border, as does MONAI's valid map
    assert ssim(pred, ref, 1.0) == pytest.approx(sk, abs=2e-4)
    # data range matters and is reported
    assert psnr(pred, ref, 2.0) == pytest.approx(psnr(pred, ref, 1.0) + 20 * np.log10(2), abs=1e-3)


def test_region_metrics_use_only_region_voxels(pair):
    pred, ref = pair
    region = np.zeros(ref.shape, bool)
    region[:20] = True
    worse = pred.copy()
    worse[20:] += 0.5  # damage outside the region only
    assert psnr(worse, ref, 1.0, region) == pytest.approx(psnr(pred, ref, 1.0, region), abs=1e-4)
    assert psnr(worse, ref, 1.0) < psnr(pred, ref, 1.0) - 5
    mse = np.mean((pred[region] - ref[region]) ** 2)
    assert psnr(pred, ref, 1.0, region) == pytest.approx(10 * np.log10(1.0 / mse), abs=1e-3)
    m = image_metrics(
        pred, ref, 1.0, region=region, cancellous=region, slice_axes=("axial", "sagittal")
    )
    assert m["data_range"] == 1.0
    assert m["voi"]["slices_axial"]["psnr_db"]["n"] == ref.shape[2]
    # axial slices hold 20/40 = 50 % region pixels: all count; sagittal slices are all-in or all-out
    assert m["voi"]["slices_sagittal"]["ssim"]["n"] == 20
    assert m["cancellous"]["psnr_db"] == pytest.approx(m["voi"]["psnr_db"])


def test_image_metrics_refuse_bad_input(pair):
    pred, ref = pair
    with pytest.raises(InputError, match="does not match"):
        image_metrics(pred[:-1], ref, 1.0)
    bad = pred.copy()
    bad[0, 0, 0] = np.nan
    with pytest.raises(InputError, match="NaN"):
        image_metrics(bad, ref, 1.0)
    with pytest.raises(InputError, match="positive"):
        image_metrics(pred, ref, 0.0)
    with pytest.raises(InputError, match="empty"):
        image_metrics(pred, ref, 1.0, region=np.zeros(ref.shape, bool))


def test_sub_vois_partition_the_region():
    region = np.zeros((10, 12, 14), bool)
    region[1:9, 2:12, 3:13] = True
    blocks = sub_vois(region, 2)
    assert len(blocks) == 8
    total = np.sum([b.astype(int) for b in blocks.values()], axis=0)
    assert np.array_equal(total, region.astype(int))


def test_sub_vois_without_bone_in_hr_are_left_out(tmp_path):
    """A VOI reaching past the bone into empty marrow: the sub-VOIs there would get IsoData
    thresholds inside noise (BV/TV near 0.5); they are listed, not scored, for every method."""
    hr = make_phantom(shape=(48, 48, 48), spacing_mm=0.05, bv_tv=0.15, seed=6).image
    a = hr.data[0].numpy().copy()
    a[:, :, 24:] = np.random.default_rng(0).normal(0, 60, a[:, :, 24:].shape)
    hr = tio.ScalarImage(tensor=torch.from_numpy(a[None]), affine=hr.affine)
    sr = tio.ScalarImage(tensor=torch.from_numpy(ndi.gaussian_filter(a, 0.7)[None]),
                         affine=hr.affine)  # fmt: skip
    res = evaluate(sr, hr, tmp_path / "r", name="SR")
    assert res["blocks_without_bone"] == ["block_001", "block_011", "block_101", "block_111"]
    assert res["n_blocks"] == 4 and res["agreement"]["SR"]["bv_tv"]["n"] == 4
    rows = (tmp_path / "r" / "voi_metrics.csv").read_text().splitlines()
    assert len(rows) == 1 + 5 * 2  # header + (whole VOI + 4 blocks) x (SR, HR)
    assert "block_111" not in "".join(rows)
    assert "without bone in HR" in (tmp_path / "r" / "report.html").read_text()


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    ph = make_phantom(shape=(64, 64, 64), spacing_mm=0.04, tb_th_mm=0.12, seed=2)
    hr = ph.image
    lr = degrade(hr, "hrpqct", seed=0).image
    rng = np.random.default_rng(0)
    sra = ndi.gaussian_filter(hr.data[0].numpy(), 0.8) + rng.normal(0, 30, hr.spatial_shape)
    sr = tio.ScalarImage(tensor=torch.from_numpy(sra[None].astype(np.float32)), affine=hr.affine)
    out = tmp_path_factory.mktemp("evaluate")
    uri = f"sqlite:///{out / 'mlruns.db'}"
    res = evaluate(sr, hr, out / "report", lr=lr, tracking_uri=uri, name="blurSR")
    return res, out / "report", uri, sr, hr


def test_evaluate_writes_every_file_and_consistent_numbers(report):
    res, out, _, sr, hr = report
    for name in (
        "metrics.json",
        "voi_metrics.csv",
        "slices.png",
        "agreement.png",
        "slice_metrics.png",
        "report.html",
    ):
        assert (out / name).stat().st_size > 0, name
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["methods"] == ["LR", "blurSR", "HR"]
    # the JSON's PSNR is the same computation as the metric module on the same arrays
    d = saved["data_range"]
    expect = psnr(sr.data[0].numpy(), hr.data[0].numpy(), d)
    assert saved["image_metrics"]["blurSR"]["voi"]["psnr_db"] == pytest.approx(expect, abs=1e-4)
    # a mild blur of HR is closer to HR than the degraded LR, in image metrics and BV/TV
    im = saved["image_metrics"]
    assert im["blurSR"]["voi"]["ssim"] > im["LR"]["voi"]["ssim"]
    bv = {m: saved["voi"][m]["bv_tv"] for m in saved["methods"]}
    assert abs(bv["blurSR"] - bv["HR"]) < abs(bv["LR"] - bv["HR"])
    # agreement over the 8 sub-VOIs
    a = saved["agreement"]["blurSR"]["bv_tv"]
    assert a["n"] == 8 and a["pearson"]["r"] > 0.9
    assert saved["blocks_without_bone"] == []
    rows = (out / "voi_metrics.csv").read_text().splitlines()
    assert len(rows) == 1 + 9 * 3  # header + (whole VOI + 8 blocks) x 3 methods
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 3 and "blurSR" in html


def test_evaluate_logs_numbers_and_files_to_mlflow(report):
    import mlflow

    res, out, uri, _, _ = report
    client = mlflow.MlflowClient(uri)
    run = client.get_run(res["mlflow_run_id"])
    assert run.data.metrics["eval_psnr_voi_blursr"] == pytest.approx(
        res["image_metrics"]["blurSR"]["voi"]["psnr_db"]
    )
    names = {a.path for a in client.list_artifacts(run.info.run_id, "evaluation")}
    for f in ("metrics.json", "report.html", "agreement.png", "slices.png", "voi_metrics.csv"):
        assert f"evaluation/{f}" in names


def test_evaluate_refuses_mismatched_grids(report, tmp_path):
    _, _, _, sr, hr = report
    shifted = tio.ScalarImage(tensor=sr.data[:, :-2], affine=sr.affine)
    with pytest.raises(InputError, match="HR grid"):
        evaluate(shifted, hr, tmp_path / "x")
    assert not (tmp_path / "x").exists()


def _chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    raise AssertionError("headless Chromium is needed for this test (.ci/run installs it)")


def test_report_html_renders_in_headless_chromium(report, tmp_path):
    from PIL import Image

    _, out, _, _, _ = report
    shot = tmp_path / "shot.png"
    subprocess.run(
        [
            _chromium(),
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--hide-scrollbars",
            "--window-size=1200,2400",
            f"--screenshot={shot}",
            (out / "report.html").resolve().as_uri(),
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )
    img = np.asarray(Image.open(shot).convert("L"), dtype=float)
    assert img.shape[0] > 1000
    # not blank: text and figures give many dark pixels and a wide spread of grey levels
    assert (img < 128).mean() > 0.02
    assert img.std() > 20


def test_compare_over_three_evaluated_methods(tmp_path, capsys):
    """Three SR 'methods' of increasing blur, evaluated into one MLflow experiment, then compared."""
    from bone3d.cli import main
    from bone3d.evaluation.compare import compare

    ph = make_phantom(shape=(48, 48, 48), spacing_mm=0.04, tb_th_mm=0.12, seed=4)
    hr = ph.image
    lr = degrade(hr, "hrpqct", seed=0).image
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    a = hr.data[0].numpy()
    for name, sigma in [("sharp", 0.5), ("soft", 1.0), ("blurry", 1.8)]:
        sra = ndi.gaussian_filter(a, sigma).astype(np.float32)
        sr = tio.ScalarImage(tensor=torch.from_numpy(sra[None]), affine=hr.affine)
        evaluate(sr, hr, tmp_path / name, lr=lr, tracking_uri=uri, experiment="cmp", name=name)
    res = compare(uri, "cmp")
    assert res["methods"] == ["LR", "evaluate-sharp", "evaluate-soft", "evaluate-blurry"]
    assert res["paired"] is True
    # less blur is closer to HR: the best PSNR and the best BV/TV error are the sharp method's
    assert res["best"]["psnr_db"] == "evaluate-sharp"
    t = res["table"]
    assert t["evaluate-sharp"]["bv_tv_mare"] < t["evaluate-blurry"]["bv_tv_mare"]
    assert all(t[m]["tb_th_mm_n_missed"] == 0 for m in res["methods"])  # bone in every VOI
    # tests computed on per-VOI errors: Friedman over 4 methods, 6 Holm-corrected pairs
    assert "friedman" in res["tests"]["bv_tv"]["errors"]
    assert len(res["tests"]["bv_tv"]["errors"]["posthoc"]) == 6
    assert (
        main(["compare", "--tracking-uri", uri, "--experiment", "cmp", "-o", str(tmp_path / "c")])
        == 0
    )
    out = capsys.readouterr().out
    assert "evaluate-sharp" in out and "*" in out and "Friedman" in out
    assert (tmp_path / "c" / "compare.csv").is_file()


def test_cli_evaluate_with_all_slice_axes(report, tmp_path, capsys):
    from bone3d.cli import main
    from bone3d.io import write_volume

    _, _, _, sr, hr = report
    p_sr = write_volume(sr, tmp_path / "sr.nii.gz")
    p_hr = write_volume(hr, tmp_path / "hr.nii.gz")
    args = ["evaluate", "--pred", str(p_sr), "--hr", str(p_hr), "-o", str(tmp_path / "o")]
    assert main([*args, "--slice-axes", "coronal", "sagittal", "--split", "1"]) == 0
    assert "PSNR" in capsys.readouterr().out
    saved = json.loads((tmp_path / "o" / "metrics.json").read_text())
    block = saved["image_metrics"]["SR"]["voi"]
    assert {"slices_axial", "slices_coronal", "slices_sagittal"} <= set(block)
    assert block["slices_coronal"]["psnr_db"]["n"] == hr.spatial_shape[1]


def test_threshold_is_computed_once_per_volume_unless_asked_per_sub_voi(tmp_path):
    """A sparse sub-VOI where SR holds a faint blob (mid-grey blur) beside dense bone: with one
    threshold per volume (the default, as a scan is segmented) the blob stays marrow and every
    sub-VOI of a method shares its threshold; computed inside each sub-VOI the threshold drops
    into the blur there and segments it as bone."""
    a = make_phantom(shape=(48, 48, 48), spacing_mm=0.05, bv_tv=0.2, seed=7).image
    hr_a = a.data[0].numpy().copy()
    rng = np.random.default_rng(0)
    sparse = rng.normal(0, 20, (24, 24, 24)).astype(np.float32)
    sparse[4:7, :, 6:9] = 1000.0  # a rod: 1.6 % bone, so the sub-VOI is scored
    hr_a[24:, 24:, 24:] = sparse
    sr_a = hr_a.copy()
    sr_a[32:40, 32:40, 32:40] += 400.0  # the blob, 40 % of the way from marrow to bone

    def image(x):
        return tio.ScalarImage(tensor=torch.from_numpy(x[None]), affine=a.affine)

    def block(scope):
        res = evaluate(image(sr_a), image(hr_a), tmp_path / scope, threshold_scope=scope)
        rows = {}
        with open(tmp_path / scope / "voi_metrics.csv") as f:
            for r in csv.DictReader(f):
                rows[(r["voi"], r["method"])] = r
        return res, rows

    res, rows = block("volume")
    assert res["threshold_scope"] == "volume" and "once per volume" in res["threshold"]
    for m in ("SR", "HR"):
        assert len({rows[k]["threshold"] for k in rows if k[1] == m}) == 1
    truth = float(rows[("block_111", "HR")]["bv_tv"])
    assert truth == pytest.approx(216 / 24**3, rel=0.05)
    assert float(rows[("block_111", "SR")]["bv_tv"]) == pytest.approx(truth, rel=0.05)
    _, local = block("voi")
    assert float(local[("block_111", "SR")]["bv_tv"]) > truth + 0.03
    assert float(local[("block_111", "SR")]["threshold"]) < 400
    with pytest.raises(InputError, match="threshold_scope"):
        evaluate(image(sr_a), image(hr_a), tmp_path / "x", threshold_scope="slice")
