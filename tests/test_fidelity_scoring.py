"""benchmarks/fidelity.py scoring: every method on one region fixed by the data, so a method's
row does not depend on which other methods are in the run."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from bone3d.data.phantom import make_phantom


def _benchmark(name: str):
    """``benchmarks/<name>.py`` imported as a module (the benchmarks are scripts, not a package)."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"{name}_benchmark", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _fidelity():
    return _benchmark("fidelity")


def test_baseline_rows_do_not_change_with_the_other_methods():
    fid = _fidelity()
    hr = make_phantom(shape=(50, 50, 50), spacing_mm=0.05, bv_tv=0.2, seed=4).image
    hr = hr.data[0].numpy().astype(np.float32)
    rng = np.random.default_rng(0)
    lr = hr + rng.normal(0, 150, hr.shape).astype(np.float32)
    short = lr[:49, :49, :49]  # a post-upsampling output a voxel short of the HR grid
    assert fid.scored_shape(hr.shape) == (48, 48, 48)
    alone = fid.score_volume({"LR": lr}, hr)
    beside = fid.score_volume({"LR": lr, "SR": short}, hr)
    assert [r for r in beside if r["method"] in ("LR", "HR")] == alone
    # the short output is scored on the same region: identical data, identical row
    sr = {r["voi"]: r for r in beside if r["method"] == "SR"}
    for r in (r for r in alone if r["method"] == "LR"):
        assert {k: v for k, v in sr[r["voi"]].items() if k != "method"} == {
            k: v for k, v in r.items() if k != "method"
        }
    with pytest.raises(ValueError, match="does not cover the scored region"):
        fid.score_volume({"LR": lr, "tiny": lr[:40, :40, :40]}, hr)


def test_purify_protocol_removes_a_marrow_speck_from_every_parameter():
    """A bright speck in the marrow (an SR artefact) adds a particle: Conn.D drops and Tb.Sp
    shrinks when scored raw; the purified protocol (BoneJ Purify per sub-VOI) drops it."""
    from scipy import ndimage as ndi

    fid = _fidelity()
    hr = make_phantom(shape=(48, 48, 48), spacing_mm=0.05, bv_tv=0.15, seed=5).image
    hr = hr.data[0].numpy().astype(np.float32)
    bone = hr > 0.5 * (hr.min() + hr.max())
    far = ndi.distance_transform_edt(~bone)
    far[:2], far[-2:], far[:, :2], far[:, -2:], far[:, :, :2], far[:, :, -2:] = (0,) * 6
    i, j, k = np.unravel_index(np.argmax(far[:24, :24, :24]), (24, 24, 24))
    assert far[i, j, k] > 4  # a marrow space wide enough to hold the speck apart from bone
    sr = hr.copy()
    sr[i - 1 : i + 1, j - 1 : j + 1, k - 1 : k + 1] = hr.max()
    vox = "block_000"

    def rows(purify):
        r = {x["method"]: x for x in fid.score_volume({"SR": sr}, hr, purify=purify)
             if x["voi"] == vox}  # fmt: skip
        return r["SR"], r["HR"]

    raw_sr, raw_hr = rows(False)
    assert raw_sr["conn_d_per_mm3"] < raw_hr["conn_d_per_mm3"]  # one more particle
    assert raw_sr["tb_sp_mm"] < raw_hr["tb_sp_mm"]
    pur_sr, pur_hr = rows(True)
    for p in ("bv_tv", "tb_th_mm", "tb_sp_mm", "conn_d_per_mm3", "da"):
        assert abs(pur_sr[p] - pur_hr[p]) <= abs(raw_sr[p] - raw_hr[p])
    assert pur_sr["conn_d_per_mm3"] == pytest.approx(pur_hr["conn_d_per_mm3"])


def _rows(rng, noise: dict[str, float], n: int = 12) -> list[dict]:
    """Sub-VOI rows as `score_volume` writes them: HR, and each method's parameters off HR's by
    a relative error of SD ``noise[method]`` (PSNR falls as the noise grows)."""
    from bone3d.evaluation.report import PARAMS

    hr = {p: rng.uniform(0.5, 2.0, n) for p in PARAMS}
    rows = [
        {"method": "HR", "specimen": "s", "voi": f"v{i}", **{p: hr[p][i] for p in PARAMS}}
        for i in range(n)
    ]
    for m, sd in noise.items():
        rows += [
            {"method": m, "specimen": "s", "voi": f"v{i}", "psnr_db": 30 - 10 * sd,
             "ssim": 0.9, **{p: hr[p][i] * (1 + sd * rng.standard_normal()) for p in PARAMS}}
            for i in range(n)
        ]  # fmt: skip
    return rows


def test_training_seeds_pool_into_mean_and_sd_per_model():
    fid = _fidelity()
    rng = np.random.default_rng(0)
    noise = {"LR trilinear": 0.3, "net": 0.1, "net@seed1": 0.05, "net@seed2": 0.15}
    per = fid.summarise(_rows(rng, noise))
    assert list(per) == list(noise)  # each seed scored on its own
    pooled = fid.pool_seeds(per)
    assert list(pooled) == ["LR trilinear", "net"]
    assert pooled["LR trilinear"] == per["LR trilinear"]
    assert pooled["net"]["seeds"] == [0, 1, 2]
    for k in ("psnr_db", "bv_tv_mare", "tb_sp_mm_r", "conn_d_per_mm3_icc", "fidelity_vs_lr"):
        vals = [per[m][k] for m in ("net", "net@seed1", "net@seed2")]
        assert pooled["net"][k] == pytest.approx(np.mean(vals))
        assert pooled["net"][f"{k}_sd"] == pytest.approx(np.std(vals, ddof=1))
    assert pooled["net"]["fidelity_vs_lr_sd"] > 0.1 * pooled["net"]["fidelity_vs_lr"]
    # a model trained once, with a seed other than 0, keeps its scores under its plain name
    alone = fid.pool_seeds({"net@seed3": per["net@seed1"]})
    assert alone["net"]["bv_tv_mare"] == per["net@seed1"]["bv_tv_mare"]
    assert alone["net"]["seeds"] == [3] and "bv_tv_mare_sd" not in alone["net"]


def test_a_seed_ensemble_averages_away_what_each_training_invents():
    """Three trainings that each add their own noise specks to the same bone: their voxel-wise
    mean keeps the bone and thins the specks, so its PSNR and Conn.D beat every seed's; the
    ensemble is a method of its own beside the pooled seeds; one-seed models get none."""
    fid = _fidelity()
    hr = make_phantom(shape=(48, 48, 48), spacing_mm=0.05, bv_tv=0.15, seed=6).image
    hr = hr.data[0].numpy().astype(np.float32)
    rng = np.random.default_rng(1)
    vols = {"LR trilinear": hr + rng.normal(0, 300, hr.shape).astype(np.float32)}
    for key in ("net", "net@seed1", "net@seed2"):
        vols[key] = hr + rng.normal(0, 300, hr.shape).astype(np.float32)
    vols["other@seed4"] = vols["net"]  # one training only: no ensemble
    ens = fid.seed_ensembles(vols)
    assert list(ens) == ["net@ensemble"]
    np.testing.assert_allclose(
        ens["net@ensemble"], (vols["net"] + vols["net@seed1"] + vols["net@seed2"]) / 3, atol=1e-3
    )
    rows = fid.score_volume({**vols, **ens}, hr)
    per = fid.summarise([{"specimen": "s", **r} for r in rows])
    pooled = fid.pool_seeds(per)
    assert set(pooled) == {"LR trilinear", "net", "other", "net@ensemble"}
    assert pooled["net@ensemble"] == per["net@ensemble"]
    for seed in ("net", "net@seed1", "net@seed2"):
        assert per["net@ensemble"]["psnr_db"] > per[seed]["psnr_db"] + 3  # noise SD / sqrt(3)
        assert per["net@ensemble"]["conn_d_per_mm3_mare"] < per[seed]["conn_d_per_mm3_mare"]
    with pytest.raises(ValueError, match="differ in shape"):
        fid.seed_ensembles({"net": hr, "net@seed1": hr[:40]})


def test_a_method_that_loses_the_bone_of_a_voi_is_not_excused_there(tmp_path, capsys):
    """summarise: where HR has bone but a method segments none, its undefined Tb.Th counts as a
    100 % error (it used to leave the VOI out, so a method scored best exactly where it failed
    most); R and ICC stay over the VOIs where both are defined; `resummarise` applies this to a
    result file's rows."""
    fid = _fidelity()
    rng = np.random.default_rng(2)
    rows = _rows(rng, {"LR trilinear": 0.3, "lost-3d": 0.1, "kept-3d": 0.1})
    hr = {r["voi"]: r for r in rows if r["method"] == "HR"}
    for r in rows:
        if r["method"] == "lost-3d" and r["voi"] == "v0":
            r["tb_th_mm"] = None  # no bone: no thickness
        if r["method"] == "kept-3d" and r["voi"] == "v0":
            r["tb_th_mm"] = 1.5 * hr["v0"]["tb_th_mm"]  # bone, read 50 % thick
    s = fid.summarise(rows)
    rel = {
        m: [
            abs(r["tb_th_mm"] - hr[r["voi"]]["tb_th_mm"]) / hr[r["voi"]]["tb_th_mm"]
            for r in rows
            if r["method"] == m and r["voi"] != "v0"
        ]
        for m in ("lost-3d", "kept-3d")
    }
    assert s["lost-3d"]["tb_th_mm_mare"] == pytest.approx((sum(rel["lost-3d"]) + 1.0) / 12)
    assert s["kept-3d"]["tb_th_mm_mare"] == pytest.approx((sum(rel["kept-3d"]) + 0.5) / 12)
    assert s["lost-3d"]["tb_th_mm_n_missed"] == 1 and s["kept-3d"]["tb_th_mm_n_missed"] == 0
    assert s["lost-3d"]["tb_th_mm_mare"] > np.mean(rel["lost-3d"]) + 0.07  # no longer left out
    x = [r["tb_th_mm"] for r in rows if r["method"] == "lost-3d" and r["voi"] != "v0"]
    y = [hr[f"v{i}"]["tb_th_mm"] for i in range(1, 12)]
    assert s["lost-3d"]["tb_th_mm_r"] == pytest.approx(np.corrcoef(x, y)[0, 1])
    # a result file resummarised from its rows: test and validation, seeds pooled, acceptance
    both = [dict(r, degradation="hrpqct", split="test") for r in rows]
    both += [dict(r, degradation="hrpqct", split="validation") for r in rows]
    runs = {f"{m}-3d": {"bundle": m, "variant": "3d", "morphometry_loss": False}
            for m in ("lost", "kept")}  # fmt: skip
    stale = {"rows": both, "trainings": {"hrpqct": runs}, "data": {"hr_spacing_mm": 0.05},
             "summary": {"hrpqct": {}}, "acceptance": {}}  # fmt: skip
    fresh = fid.resummarise(stale)
    assert fresh["summary"]["hrpqct"]["lost-3d"]["tb_th_mm_mare"] == s["lost-3d"]["tb_th_mm_mare"]
    assert fresh["validation_summary"]["hrpqct"]["kept-3d"] == s["kept-3d"]
    val = fresh["validation_summary"]["hrpqct"]
    assert fresh["acceptance"]["hrpqct"]["best"] == min(
        ("lost-3d", "kept-3d"), key=lambda m: val[m]["fidelity_vs_lr"]
    )
    assert fresh["data"]["missed_values"] == fid.MISSED and stale["acceptance"] == {}
    # the command line: a file rewritten from its rows; a corrupt one refused and left as it was
    good, bad = tmp_path / "good.json", tmp_path / "bad.json"
    good.write_text(json.dumps(stale))
    bad.write_text('{"rows": [')
    assert fid.main(["--resummarise", str(good)]) == 0
    assert json.loads(good.read_text())["summary"] == json.loads(json.dumps(fresh["summary"]))
    assert "hrpqct: best" in capsys.readouterr().out
    assert fid.main(["--resummarise", str(bad)]) == 2
    assert bad.read_text() == '{"rows": [' and "cannot resummarise" in capsys.readouterr().err


def test_best_model_is_chosen_on_validation_and_judged_on_test():
    fid = _fidelity()
    rng = np.random.default_rng(1)
    test = fid.summarise(_rows(rng, {"LR trilinear": 0.3, "a": 0.05, "b": 0.2}))
    val = fid.summarise(_rows(rng, {"LR trilinear": 0.3, "a": 0.2, "b": 0.05}))
    assert test["a"]["fidelity_vs_lr"] < test["b"]["fidelity_vs_lr"]
    assert val["b"]["fidelity_vs_lr"] < val["a"]["fidelity_vs_lr"]
    acc = fid.acceptance({"hrpqct": test}, {"hrpqct": ["a", "b"]}, {"hrpqct": val})["hrpqct"]
    assert acc["best"] == "b" and acc["best_chosen_on"] == "validation"
    assert acc["best_fidelity_vs_lr"] == {
        "validation": val["b"]["fidelity_vs_lr"],
        "test": test["b"]["fidelity_vs_lr"],
    }
    # the criteria read the chosen model's test scores
    assert acc["error_vs_lr"]["bv_tv"]["best"] == test["b"]["bv_tv_mare"]
    assert acc["psnr_gain_db"]["gain"] == pytest.approx(
        test["b"]["psnr_db"] - test["LR trilinear"]["psnr_db"]
    )
    # without validation scores the choice falls back to the test scores, and says so
    acc = fid.acceptance({"hrpqct": test}, {"hrpqct": ["a", "b"]})["hrpqct"]
    assert acc["best"] == "a" and acc["best_chosen_on"] == "test"


def test_sub_vois_without_bone_in_hr_are_left_out_for_every_method():
    """Half of HR is empty marrow with noise (as BoneBox ROI 65 past the trabecular bone): its
    IsoData threshold would split noise into 'bone' (BV/TV near 0.5), so those sub-VOIs are not
    scored, for HR and every method alike; the sub-VOIs with bone score as before."""
    from bone3d.evaluation.report import bone_blocks, voi_morphometry

    fid = _fidelity()
    hr = make_phantom(shape=(48, 48, 48), spacing_mm=0.05, bv_tv=0.15, seed=6).image
    hr = hr.data[0].numpy().astype(np.float32)
    half = hr.copy()
    half[24:] = np.random.default_rng(0).normal(0, 60, half[24:].shape)  # marrow, HR noise
    everywhere = np.ones(hr.shape, bool)
    kept, empty = bone_blocks(half, everywhere, 2)
    assert sorted(empty) == ["block_100", "block_101", "block_110", "block_111"]
    assert sorted(kept) == ["block_000", "block_001", "block_010", "block_011"]
    assert bone_blocks(hr, everywhere, 2)[1] == []
    # what the left-out blocks would have scored: noise segmented as bone
    noise = voi_morphometry(half, (0.05,) * 3, bone_blocks(hr, everywhere, 2)[0]["block_111"],
                            "isodata")  # fmt: skip
    assert noise["bv_tv"] > 0.3 and noise["da"] < 0.2
    lr = half + np.random.default_rng(1).normal(0, 100, half.shape).astype(np.float32)
    rows = fid.score_volume({"LR": lr}, half)
    assert {r["voi"] for r in rows} == set(kept)
    assert {r["method"] for r in rows} == {"LR", "HR"}
    full = {(r["method"], r["voi"]): r for r in fid.score_volume({"LR": lr}, hr)}
    for r in rows:  # the blocks with bone: the same bone, up to the volume's threshold
        if r["method"] == "HR":
            assert r["bv_tv"] == pytest.approx(full[("HR", r["voi"])]["bv_tv"], rel=0.02)
    # thresholded inside each sub-VOI, identical data give identical morphometry
    local = fid.score_volume({"LR": lr}, half, threshold="voi")
    full = {(r["method"], r["voi"]): r for r in fid.score_volume({"LR": lr}, hr, threshold="voi")}
    for r in local:
        if r["method"] == "HR":
            assert r["bv_tv"] == full[("HR", r["voi"])]["bv_tv"]


def test_a_work_folder_built_for_another_split_is_refused(tmp_path, capsys):
    """Trainings in the work folder are reused: a datalist of another split must not be."""
    from bone3d.data.datalist import write_datalist

    fid = _fidelity()
    ids = ["a", "b", "c", "d"]
    old = {"training": ["a", "b"], "validation": ["c"], "test": ["d"]}
    out = tmp_path / "hrpqct" / "data"
    items = [{"specimen": i, "image": str(tmp_path / f"{i}.nii.gz")} for i in ids]
    path = write_datalist(out / "datalist.json", items, old, preset="hrpqct")
    before = path.read_text()
    assert fid.build_dataset([], old, "hrpqct", out, 0) == path  # same split: reused as is
    new = {"training": ["a"], "validation": ["b", "c"], "test": ["d"]}
    with pytest.raises(SystemExit) as exit_:
        fid.build_dataset([], new, "hrpqct", out, 0)
    assert exit_.value.code == 2 and "holds another split" in capsys.readouterr().err
    assert path.read_text() == before


@pytest.mark.realdata
def test_cortical_phantoms_add_wide_bone_free_space_to_training_only():
    """The cortical phantoms bring what the trabecular ROIs lack: a shell and wide empty space
    outside it (voxels > 0.75 mm from bone); they always train, and adding them leaves the other
    volumes and the test/validation split as they were."""
    from scipy import ndimage as ndi

    fid = _fidelity()
    base = fid.hr_volumes(1, 0)
    more = fid.hr_volumes(1, 0, 1)
    assert [v["id"] for v in more] == [v["id"] for v in base] + ["cortical00"]
    for a, b in zip(base, more[: len(base)], strict=True):
        assert np.array_equal(a["image"].data.numpy(), b["image"].data.numpy())
    grey = more[-1]["image"].data[0].numpy()
    far = ndi.distance_transform_edt(grey < 500) * fid.HR_MM > 0.75
    trabecular = base[-1]["image"].data[0].numpy()
    assert far.mean() > 0.3
    assert (ndi.distance_transform_edt(trabecular < 500) * fid.HR_MM > 0.75).mean() < 0.05
    split = fid.donor_split(more, 4, 2, 0)
    assert split == fid.donor_split(base, 4, 2, 0) | {"training": split["training"]}
    assert "cortical00" in split["training"]


@pytest.mark.realdata
def test_sparse_phantoms_add_low_density_bone_to_training_only():
    """The perforated phantoms bring the low BV/TV that the training ROIs lack (below the BoneBox
    collection's minimum ROI BV/TV, 0.041, for one of these draws); they always train, and
    adding them leaves the other volumes and the test/validation split as they were."""
    from bone3d.evaluation.report import voi_morphometry

    fid = _fidelity()
    base = fid.hr_volumes(1, 0, 1)
    more = fid.hr_volumes(1, 0, 1, 2)
    assert [v["id"] for v in more] == [v["id"] for v in base] + ["sparse00", "sparse01"]
    for a, b in zip(base, more[: len(base)], strict=True):
        assert np.array_equal(a["image"].data.numpy(), b["image"].data.numpy())
    bv = []
    for v in more[-2:]:
        grey = v["image"].data[0].numpy()
        voi = np.ones(grey.shape, bool)
        bv.append(voi_morphometry(grey, (fid.HR_MM,) * 3, voi, "isodata")["bv_tv"])
    assert all(0.03 < b < 0.08 for b in bv) and min(bv) < 0.041
    split = fid.donor_split(more, 4, 2, 0)
    assert split == fid.donor_split(base, 4, 2, 0) | {"training": split["training"]}
    assert {"sparse00", "sparse01"} <= set(split["training"])


def test_phantom_counts_must_not_be_negative():
    """A negative --phantoms / --cortical-phantoms is refused (argparse: one line, exit 2)
    instead of silently training on none."""
    import argparse

    fid = _fidelity()
    assert fid._count("0") == 0 and fid._count("3") == 3
    with pytest.raises(argparse.ArgumentTypeError, match="negative"):
        fid._count("-1")


def test_bundle_args_trial_needs_its_own_output_and_work(tmp_path, capsys):
    """--bundle-args (a trial's extra `monai.bundle run` arguments) must not overwrite the
    headline JSON, and a work folder whose trainings had other arguments or epochs is refused
    (they would be reused as if they were the asked ones)."""
    fid = _fidelity()
    with pytest.raises(SystemExit) as err:
        fid.main(["--bundle-args=--loss#threshold otsu_each"])
    assert err.value.code == 2 and "give --out" in capsys.readouterr().err
    with pytest.raises(SystemExit) as err:  # the regressor term is a trial too
        fid.main(["--regressor", "0.1"])
    assert err.value.code == 2 and "--regressor is a trial" in capsys.readouterr().err
    with pytest.raises(SystemExit) as err:  # and a cross-validation fold
        fid.main(["--fold", "1"])
    assert err.value.code == 2 and "--fold is a trial" in capsys.readouterr().err
    with pytest.raises(SystemExit) as err:  # and an outer (test) fold
        fid.main(["--test-fold", "1"])
    assert err.value.code == 2 and "--test-fold is a trial" in capsys.readouterr().err
    with pytest.raises(SystemExit) as err:
        fid.main(["--regressor", "-1", "--out", str(tmp_path / "f.json")])
    assert err.value.code == 2 and "a weight >= 0" in capsys.readouterr().err
    with pytest.raises(SystemExit) as err:  # a label level for a regressor that is not fitted
        fid.main(["--regressor-level", "isodata", "--out", str(tmp_path / "f.json")])
    assert err.value.code == 2 and "needs --regressor" in capsys.readouterr().err
    run = tmp_path / "rcan-3d-morpho"
    run.mkdir()
    (run / "done.json").write_text(json.dumps({"bundle": "rcan", "epochs": 1, "train_s": 1.0}))
    args = ("rcan", "3d", True, tmp_path / "datalist.json", run, tmp_path / "db")
    assert fid.train(*args, {"3d": 1})["reused"]  # same epochs, same (no) arguments: reused
    with pytest.raises(SystemExit) as err:
        fid.train(*args, {"3d": 1}, extra=["--loss#threshold", "otsu_each"])
    assert err.value.code == 2 and "use a new --work" in capsys.readouterr().err
    with pytest.raises(SystemExit) as err:  # nor a training of another length
        fid.train(*args, {"3d": 2})
    assert err.value.code == 2 and "'epochs': 1" in capsys.readouterr().err
    with pytest.raises(SystemExit) as err:  # nor one on other 3D patches
        fid.train(*args, {"3d": 1}, patch_3d=48)
    assert err.value.code == 2 and "'3D patch': 32" in capsys.readouterr().err
    with pytest.raises(SystemExit) as err:  # the patch side is a trial too
        fid.main(["--patch-3d", "48"])
    assert err.value.code == 2 and "--patch-3d is a trial" in capsys.readouterr().err
    with pytest.raises(SystemExit) as err:
        fid.main(["--patch-3d", "40", "--out", str(tmp_path / "f.json")])
    assert err.value.code == 2 and "a multiple of 16" in capsys.readouterr().err


def test_grey_bias_separates_an_offset_from_blur():
    """benchmarks/grey_bias.py: a uniform lift shows in marrow and bone alike; a blur darkens
    the thin bone and leaves the marrow mean nearly where it was; one-class HR is refused."""
    from scipy import ndimage as ndi

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "grey_bias.py"
    spec = importlib.util.spec_from_file_location("grey_bias", path)
    gb = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gb)
    hr = make_phantom(shape=(40, 40, 40), seed=3).image.data[0].numpy()
    marrow, bone = gb.class_bias(hr + 70.0, hr, (32, 32, 32))
    assert marrow == pytest.approx(70.0, abs=1e-3) and bone == pytest.approx(70.0, abs=1e-3)
    marrow, bone = gb.class_bias(ndi.gaussian_filter(hr, 1.5), hr, (32, 32, 32))
    assert bone < -100 and abs(marrow) < abs(bone) / 2
    with pytest.raises(ValueError, match="one class"):
        gb.class_bias(hr, np.full_like(hr, 5.0), (32, 32, 32))


def test_threshold_protocols_differ_where_a_sub_voi_holds_only_blur():
    """A sub-VOI of faint blur (SR unsure of sparse bone) beside dense bone: IsoData computed
    inside that sub-VOI splits the blur into 'bone'; computed over the volume, or fixed at the
    marrow-tissue midpoint (Scanco's convention), it leaves the blur as marrow. Where every
    sub-VOI is bone and marrow alike, the three protocols agree on HR."""
    fid = _fidelity()
    hr = make_phantom(shape=(48, 48, 48), spacing_mm=0.05, bv_tv=0.2, seed=7).image
    hr = hr.data[0].numpy().astype(np.float32)
    rng = np.random.default_rng(0)
    sparse = rng.normal(0, 20, (24, 24, 24)).astype(np.float32)  # marrow with HR's noise
    sparse[4:7, :, 6:9] = 1000.0  # one rod of bone tissue: the sub-VOI keeps 1.6 % bone
    hr_sparse = hr.copy()
    hr_sparse[24:, 24:, 24:] = sparse
    sr = hr_sparse.copy()
    sr[32:40, 32:40, 32:40] += 400.0  # a faint blob, 40 % of the way from marrow to bone
    blk = "block_111"

    def row(threshold, method):
        rows = fid.score_volume({"SR": sr}, hr_sparse, threshold=threshold)
        return next(r for r in rows if r["voi"] == blk and r["method"] == method)

    truth = row("voi", "HR")["bv_tv"]
    assert truth == pytest.approx(216 / 24**3, rel=0.05)
    per_voi, per_volume, fixed = row("voi", "SR"), row("volume", "SR"), row(500, "SR")
    assert per_voi["bv_tv"] > truth + 0.03  # the blob (8^3 of 24^3) segmented as bone
    assert per_volume["bv_tv"] == pytest.approx(truth, rel=0.05)
    assert fixed["bv_tv"] == pytest.approx(truth, rel=0.05)
    assert per_voi["threshold"] < 400 < per_volume["threshold"]
    assert fixed["threshold"] == 500.0
    # on the dense HR phantom the thresholds agree to within its noise: same BV/TV to 2 %
    dense = {t: fid.score_volume({}, hr, threshold=t) for t in ("voi", "volume", 500.0)}
    for a, b, c in zip(*dense.values(), strict=True):
        assert a["bv_tv"] == pytest.approx(b["bv_tv"], rel=0.02)
        assert a["bv_tv"] == pytest.approx(c["bv_tv"], rel=0.02)
    with pytest.raises(ValueError, match="'voi', 'volume' or a number"):
        fid.score_volume({}, hr, threshold="otsu")


def test_threshold_option_names_its_own_output(tmp_path, capsys):
    """--threshold parses voi, volume or a finite number; anything else exits 2."""
    fid = _fidelity()
    assert fid._threshold("voi") == "voi" and fid._threshold("500") == 500.0
    assert fid._threshold_name(500.0) == "500" and fid._threshold_name("volume") == "volume"
    for bad in ("otsu", "nan", "inf"):
        with pytest.raises(SystemExit) as e:
            fid.main(["--threshold", bad, "--work", str(tmp_path)])
        assert e.value.code == 2
    assert "mg HA/cm^3" in capsys.readouterr().err


def test_error_measures_show_one_near_zero_reference_swamping_the_mean_relative_error(tmp_path):
    """benchmarks/error_measures.py: a model closer to HR than LR in three VOIs of four, with a
    wrong sign where HR's Conn.D is almost zero, loses on the issue's mean relative error (the
    division by 0.02) and wins on the median and on the normalised mean absolute error; its
    ``mare`` is the benchmark's own (`fidelity.summarise`), and the worst VOI is named."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "error_measures.py"
    spec = importlib.util.spec_from_file_location("error_measures", path)
    em = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(em)
    fid = _fidelity()
    conn = {"HR": [1.0, 1.2, 0.8, 0.02], "LR trilinear": [0.5, 0.6, 0.4, 0.05], "SR": [0.9, 1.1, 0.7, -0.3]}  # fmt: skip
    rows = []
    for m, values in conn.items():
        for i, c in enumerate(values):
            other = {p: 0.1 * (i + 1) * (1.2 if m == "LR trilinear" else 1.0) for p in fid.FIDELITY}
            other["tb_n_per_mm"] = 1.0
            other["tb_th_mm"] = None if (m == "LR trilinear" and i == 0) else other["tb_th_mm"]
            rows.append({"degradation": "mdct", "split": "test", "specimen": "s", "voi": f"b{i}",
                         "method": m, "psnr_db": 20.0, "ssim": 0.5, **other, "conn_d_per_mm3": c})  # fmt: skip
    res = em.ratios(rows, "mdct", "test")["SR"]["params"]["conn_d_per_mm3"]
    rel_sr = [0.1 / 1.0, 0.1 / 1.2, 0.1 / 0.8, 0.32 / 0.02]
    rel_lr = [0.5, 0.5, 0.5, 1.5]
    assert res["mare_vs_lr"] == pytest.approx(np.mean(rel_sr) / np.mean(rel_lr))
    assert res["mare_vs_lr"] > 5  # the measure: far worse than LR
    assert res["median_vs_lr"] == pytest.approx(np.median(rel_sr) / np.median(rel_lr))
    assert res["median_vs_lr"] < 0.25
    assert (
        res["nmae_vs_lr"] == pytest.approx((0.62 / 3.02) / (1.53 / 3.02))
        and res["nmae_vs_lr"] < 0.5
    )
    assert res["worst_voi"] == "s/b3" and res["hr_at_worst"] == 0.02
    assert res["mare_without_worst_vs_lr"] == pytest.approx(np.mean(rel_sr[:3]) / 0.5)
    # the same mean relative error as the benchmark's summary, None values left out alike
    summary = fid.summarise(rows)
    for p in fid.FIDELITY:
        ratio = summary["SR"][f"{p}_mare"] / summary["LR trilinear"][f"{p}_mare"]
        assert em.ratios(rows, "mdct", "test")["SR"]["params"][p]["mare_vs_lr"] == pytest.approx(
            ratio
        )
    # a second model 30 % off HR's Conn.D everywhere: the mean relative error prefers it, the
    # normalised mean absolute error prefers SR; the choice reads validation, the ratios test
    hr_conn = {r["voi"]: r["conn_d_per_mm3"] for r in rows if r["method"] == "HR"}
    sr2 = [
        dict(r, method="SR2", conn_d_per_mm3=1.3 * hr_conn[r["voi"]])
        for r in rows
        if r["method"] == "SR"
    ]
    both = rows + sr2
    both += [dict(r, split="validation") for r in both]
    picks = em.choices(both, "mdct")
    assert picks["mare"]["best"] == "SR2" and picks["nmae"]["best"] == "SR"
    assert picks["mare"]["test"]["conn_d_per_mm3"] == pytest.approx(0.3 / 0.75)
    # the choice reads validation alone: SR2 six times HR's Conn.D on test (worse than SR
    # there by the mean relative error) is still chosen, and scored on its test rows
    far = [dict(r, conn_d_per_mm3=6.0 * hr_conn[r["voi"]]) for r in sr2]
    split_apart = rows + far + [dict(r, split="validation") for r in rows + sr2]
    picks = em.choices(split_apart, "mdct")
    assert picks["mare"]["best"] == "SR2"
    assert picks["mare"]["test"]["conn_d_per_mm3"] == pytest.approx(5.0 / 0.75)
    with pytest.raises(ValueError, match="non-zero reference"):
        em.measures([1.0, 2.0], [0.0, 0.0])
    with pytest.raises(ValueError, match="fewer than 3"):  # one pair left: the miss
        em.measures([1.0, np.nan], [0.0, 2.0])
    # a missed VOI (no bone, an undefined value) counts as a 100 % error in all three measures
    miss = em.measures([np.nan, 1.0, 1.0, 1.0], [1.0, 1.0, 1.0, 1.0])
    assert miss["mare"] == miss["nmae"] == 0.25 and miss["n_missed"] == 1 and miss["worst"] == 0
    with pytest.raises(ValueError, match="no HR rows"):
        em.ratios(rows, "hrpqct", "test")
    # several files pooled (the outer folds): each file's rows meet its own HR rows, so one
    # donor name in two files is two clusters; here the second file's HR Conn.D differs, and
    # the pooled ratio is the mean over all eight pairs, each against its own file's HR
    second = [
        dict(r, conn_d_per_mm3=2.0 * r["conn_d_per_mm3"]) if r["method"] == "HR" else r
        for r in rows
    ]
    files = []
    for i, rs in enumerate((rows, second)):
        files.append(tmp_path / f"fold{i}.json")
        files[-1].write_text(json.dumps({"rows": rs}))
    pooled = em.pooled_rows([str(f) for f in files])
    assert {r["specimen"] for r in pooled} == {"0:s", "1:s"} and len(pooled) == 2 * len(rows)
    conn = em.ratios(pooled, "mdct", "test")["SR"]["params"]["conn_d_per_mm3"]
    hr2 = [2.0 * c for c in [1.0, 1.2, 0.8, 0.02]]
    rel_sr2 = [abs(s - h) / h for s, h in zip([0.9, 1.1, 0.7, -0.3], hr2, strict=True)]
    rel_lr2 = [abs(s - h) / h for s, h in zip([0.5, 0.6, 0.4, 0.05], hr2, strict=True)]
    expected = np.mean(rel_sr + rel_sr2) / np.mean(rel_lr + rel_lr2)
    assert conn["mare_vs_lr"] == pytest.approx(expected)
    # one file is read as it is; a file without rows is refused by name, and by main (exit 2)
    assert em.pooled_rows([str(files[0])]) == rows
    (tmp_path / "empty.json").write_text(json.dumps({"rows": []}))
    with pytest.raises(ValueError, match="empty.json holds no rows"):
        em.pooled_rows([str(files[0]), str(tmp_path / "empty.json")])
    assert em.main([str(files[0]), str(tmp_path / "empty.json")]) == 2
    assert em.main([str(f) for f in files]) == 0


def test_cross_validation_folds_keep_the_test_donors_and_rotate_validation():
    """fidelity.donor_split(fold=k): the same test donors, validation taken from the next places
    of the same seeded order (fold 0 is the headline split), the earlier validation donors
    training; a fold the non-test donors cannot fill is refused."""
    fid = _fidelity()
    vols = [{"id": f"bonebox_{i:05d}_1", "donor": f"bonebox_{i:05d}"} for i in range(10)]
    vols += [{"id": f"bonebox_99999_{k}", "donor": "bonebox_99999"} for k in range(3)]
    vols += [{"id": "lhdl", "donor": "lhdl"}]
    folds = [fid.donor_split(vols, 4, 2, 0, fold=k) for k in range(3)]
    assert folds[0] == fid.donor_split(vols, 4, 2, 0)
    vals = [set(f["validation"]) for f in folds]
    assert all(f["test"] == folds[0]["test"] for f in folds)
    assert all(len(v) == 2 for v in vals) and len(vals[0] | vals[1] | vals[2]) == 6
    assert vals[0] <= set(folds[1]["training"]) and vals[1] <= set(folds[2]["training"])
    for f in folds:  # the donor with several ROIs and LHDL always train; 14 - 6 volumes train
        assert {"bonebox_99999_0", "lhdl"} <= set(f["training"]) and len(f["training"]) == 8
    with pytest.raises(ValueError, match="3 folds of 2"):
        fid.donor_split(vols, 4, 2, 0, fold=3)


def test_test_folds_test_every_single_roi_donor_once():
    """fidelity.donor_split(test_fold=t): disjoint test donors per fold, all ten single-ROI
    donors tested once over five folds of two; validation never overlaps test; fold 0 is the
    headline split; a fold past the donors is refused."""
    fid = _fidelity()
    vols = [{"id": f"bonebox_{i:05d}_1", "donor": f"bonebox_{i:05d}"} for i in range(10)]
    vols += [{"id": f"bonebox_99999_{k}", "donor": "bonebox_99999"} for k in range(3)]
    vols += [{"id": "lhdl", "donor": "lhdl"}]
    assert fid.donor_split(vols, 4, 2, 0, test_fold=0) == fid.donor_split(vols, 4, 2, 0)
    folds = [fid.donor_split(vols, 2, 2, 0, test_fold=t) for t in range(5)]
    tested = [i for f in folds for i in f["test"]]
    assert len(tested) == 10 and len(set(tested)) == 10
    for f in folds:
        assert not set(f["test"]) & set(f["validation"]) and len(f["validation"]) == 2
        assert {"bonebox_99999_0", "lhdl"} <= set(f["training"]) and len(f["training"]) == 10
        assert len(set(f["test"]) | set(f["validation"]) | set(f["training"])) == 14
    # with cross-validation inside a test fold: the same test donors, validation rotating
    inner = [fid.donor_split(vols, 2, 2, 0, fold=k, test_fold=3) for k in range(4)]
    assert all(f["test"] == folds[3]["test"] for f in inner)
    assert len({v for f in inner for v in f["validation"]}) == 8
    with pytest.raises(ValueError, match="5 test folds of 2"):
        fid.donor_split(vols, 2, 2, 0, test_fold=5)


def test_cross_validation_pools_the_validation_rows_of_the_folds(tmp_path, capsys):
    """benchmarks/cross_validation.py: the folds' validation rows pooled into one summary (the
    benchmark's own), each fold's "vs LR" beside it; test rows and methods missing from a fold
    take no part; overlapping validation donors or different test donors are refused."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "cross_validation.py"
    spec = importlib.util.spec_from_file_location("cross_validation", path)
    cv = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cv)
    fid = _fidelity()
    rng = np.random.default_rng(5)

    def fold(k: int, noise: dict, test_noise: dict | None = None) -> dict:
        rows = [dict(r, degradation="hrpqct", split="validation", specimen=f"d{k}")
                for r in _rows(rng, noise, n=6)]  # fmt: skip
        if test_noise:
            rows += [dict(r, degradation="hrpqct", split="test", specimen="t")
                     for r in _rows(rng, test_noise, n=6)]  # fmt: skip
        return {"rows": rows, "data": {"split": {"test": ["t"], "validation": [f"d{k}"]}}}

    files = [
        fold(0, {"LR trilinear": 0.3, "net": 0.1, "net@seed1": 0.2}, {"LR trilinear": 0.3, "net": 2.0}),
        fold(1, {"LR trilinear": 0.3, "net": 0.15}),
        fold(2, {"LR trilinear": 0.3, "net": 0.05}),
    ]  # fmt: skip
    res = cv.pool(files, "hrpqct")
    assert list(res["methods"]) == ["LR trilinear", "net"]  # net@seed1: fold 0 only
    assert res["donors"] == ["d0", "d1", "d2"] and res["n_voi"] == 18
    val = [r for f in files for r in f["rows"] if r["split"] == "validation" and r["method"] != "net@seed1"]  # fmt: skip
    assert res["methods"]["net"]["pooled"] == fid.summarise(val)["net"]
    per = [fid.summarise([r for r in val if r["specimen"] == f"d{k}"])["net"]["fidelity_vs_lr"]
           for k in range(3)]  # fmt: skip
    assert res["methods"]["net"]["folds"] == per
    assert res["methods"]["net"]["sd"] == pytest.approx(np.std(per, ddof=1))
    assert res["methods"]["net"]["pooled"]["fidelity_vs_lr"] < 1  # 3 times closer than LR
    with pytest.raises(ValueError, match="two files"):
        cv.pool([files[0], files[0]], "hrpqct")
    other = dict(files[1], data={"split": {"test": ["u"], "validation": ["d1"]}})
    with pytest.raises(ValueError, match="different test donors"):
        cv.pool([files[0], other], "hrpqct")
    paths = []
    for k, f in enumerate(files):
        paths.append(tmp_path / f"f{k}.json")
        paths[-1].write_text(json.dumps(f))
    assert cv.main([str(p) for p in paths]) == 0
    assert "3 folds, 3 donors, 18 sub-VOIs" in capsys.readouterr().out
    assert cv.main([str(paths[0]), str(tmp_path / "missing.json")]) == 2


def test_da_sampling_check_measures_what_the_benchmark_measures(tmp_path, capsys):
    """benchmarks/da_sampling.py: with bone3d's sampling and seed 0 its sub-VOI DA is the
    benchmark's (`score_volume`), BoneJ 2's denser sampling moves less between seeds, and the
    summary's noise floor and ratios follow from the values; a missing work folder is refused."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "da_sampling.py"
    spec = importlib.util.spec_from_file_location("da_sampling", path)
    ds = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ds)
    fid = _fidelity()
    from bone3d.evaluation.report import bone_blocks

    hr = make_phantom(shape=(48, 48, 48), spacing_mm=0.05, bv_tv=0.2, seed=7).image
    hr = hr.data[0].numpy().astype(np.float32)
    cut = hr[:48, :48, :48]
    blocks, _ = bone_blocks(cut, np.ones(cut.shape, bool), 2)
    mine = ds.sub_voi_da(cut, blocks, (0.05,) * 3, 256, 1024, 0)
    theirs = {r["voi"]: r["da"] for r in fid.score_volume({}, hr) if r["method"] == "HR"}
    assert mine == theirs and len(mine) == 8
    voi = {"block_000": blocks["block_000"]}
    cheap = [ds.sub_voi_da(cut, voi, (0.05,) * 3, 64, 256, s)["block_000"] for s in range(4)]
    dense = [ds.sub_voi_da(cut, voi, (0.05,) * 3, 1024, 4096, s)["block_000"] for s in range(4)]
    assert np.std(dense) < np.std(cheap)
    da = {
        f"{name} seed {s}": {
            "HR": {"a": 0.50, "b": 0.40 + 0.02 * s},
            "LR trilinear": {"a": 0.40, "b": 0.30},
            "SR": {"a": 0.45, "b": None},  # a miss: 100 %
        }
        for name in ds.SAMPLINGS
        for s in (0, 1)
    }
    s = ds.summarise(da, "SR")["bone3d"]
    assert s["noise_floor_mare"] == pytest.approx(np.mean([0.0, 0.02 / 0.40]))
    r1 = s["per_seed"]["bone3d seed 1"]
    assert r1["lr_mare"] == pytest.approx(np.mean([0.2, 0.12 / 0.42]))
    assert r1["method_mare"] == pytest.approx(np.mean([0.1, 1.0]))
    assert r1["ratio"] == pytest.approx(r1["method_mare"] / r1["lr_mare"])
    assert ds.main(["--work", str(tmp_path), "--method", "SR"]) == 2
    assert "no fidelity work folder" in capsys.readouterr().err


def test_verdict_uncertainty_resamples_donors_not_sub_vois(tmp_path, capsys):
    """benchmarks/verdict_uncertainty.py: the ratio is the benchmark's (`fidelity.summarise`),
    leaving a donor out is the summary without its rows, and when donors differ while their
    sub-VOIs agree, the donor bootstrap's interval is wider than the sub-VOI bootstrap's."""
    vu, fid = _benchmark("verdict_uncertainty"), _fidelity()
    assert vu.FIDELITY == fid.FIDELITY
    # the model's relative error is 0.2 in three donors and 1.5 in the fourth, LR's 0.5 in all
    sr_err = {"d0": 0.2, "d1": 0.2, "d2": 0.2, "d3": 1.5}
    rows = []
    for d, e in sr_err.items():
        for i in range(8):
            hr = {p: 1.0 + 0.1 * i for p in fid.FIDELITY}
            for m, err in (("HR", 0.0), ("LR trilinear", 0.5), ("SR", e)):
                vals = {p: v * (1 + err) for p, v in hr.items()}
                psnr = {"HR": 99.0, "LR trilinear": 20.0, "SR": 21.0 if d == "d3" else 23.0}[m]
                rows.append({"degradation": "hrpqct", "split": "test", "specimen": d,
                             "voi": f"b{i}", "method": m, "psnr_db": psnr, "ssim": 0.5,
                             "tb_n_per_mm": 1.0, **vals})  # fmt: skip
    result = {"rows": rows, "acceptance": {"hrpqct": {"best": "SR"}}}
    f = tmp_path / "r.json"
    f.write_text(json.dumps(result))
    tagged = [{**r, "_file": str(f)} for r in rows]
    b = vu.bootstrap(vu.donor_errors(tagged, "SR", "da"), 0.5, False, 4000, 0)
    s = fid.summarise(rows)
    assert b["ratio"] == pytest.approx(s["SR"]["da_mare"] / s["LR trilinear"]["da_mare"])
    assert b["ratio"] == pytest.approx((3 * 0.2 + 1.5) / 4 / 0.5)  # 1.05
    without = fid.summarise([r for r in rows if r["specimen"] != "d3"])
    assert b["leave_one_donor_out"]["d3"] == pytest.approx(
        without["SR"]["da_mare"] / without["LR trilinear"]["da_mare"]
    )
    assert b["leave_one_donor_out"]["d3"] == pytest.approx(0.4)
    lo, hi = b["donor_interval"]
    assert lo == pytest.approx(0.4) and hi > 1.5  # no d3 drawn ... d3 drawn three times or more
    assert 0.2 < b["share_meeting_target"] < 0.5  # P(d3 not drawn) = (3/4)^4 = 0.32
    vlo, vhi = b["voi_interval"]
    assert hi - lo > 1.5 * (vhi - vlo)
    # the other targets: the PSNR gain (2.5 dB; under 2 only when d3 is drawn 3+ times, p = 0.05)
    # and R as the benchmark computes them
    other = vu.other_targets(tagged, "SR", 4000, 0)
    assert other["psnr_gain_db"]["value"] == pytest.approx(2.5)
    assert other["psnr_gain_db"]["leave_one_donor_out"]["d3"] == pytest.approx(3.0)
    assert 0.9 < other["psnr_gain_db"]["share_meeting_target"] < 0.99
    for p in ("bv_tv", "tb_th_mm", "tb_sp_mm"):
        assert other[f"{p}_r"]["value"] == pytest.approx(s["SR"][f"{p}_r"])
        assert other[f"{p}_r"]["leave_one_donor_out"]["d3"] == pytest.approx(
            without["SR"][f"{p}_r"]
        )
    # identical donors: nothing to resample, the interval is the point
    same = [r for r in tagged if r["specimen"] != "d3"]
    flat = vu.bootstrap(vu.donor_errors(same, "SR", "da"), 0.5, False, 500, 0)
    assert flat["donor_interval"] == pytest.approx([0.4, 0.4]) and flat["share_meeting_target"] == 1
    # the command: the best model named in the file, a table and the JSON
    out = tmp_path / "u.json"
    assert vu.main([str(f), "--json", str(out), "--resamples", "500"]) == 0
    assert "hrpqct, SR, test" in capsys.readouterr().out
    saved = json.loads(out.read_text())["hrpqct"]
    assert saved["method"] == "SR" and set(saved["params"]) == set(fid.FIDELITY)
    with pytest.raises(SystemExit) as err:
        vu.main([str(f), "--resamples", "5"])
    assert err.value.code == 2
    with pytest.raises(SystemExit) as err:  # a method the file does not hold
        vu.main([str(f), "--method", "nonesuch"])
    assert err.value.code == 2 and "no rows of 'nonesuch'" in capsys.readouterr().err


def _rods(gap: bool) -> np.ndarray:
    """Two plates joined by four rods, clear of the array faces (no edge correction): one
    particle, three independent loops; ``gap`` cuts one rod (two loops)."""
    b = np.zeros((24, 24, 24), bool)
    b[2:5, 2:22, 2:22] = b[19:22, 2:22, 2:22] = True
    for y, x in [(6, 6), (6, 17), (17, 6), (17, 17)]:
        b[2:22, y - 1 : y + 2, x - 1 : x + 2] = True
    if gap:
        b[11:14, 5:8, 5:8] = False
    return b


def test_conn_d_components_split_connectivity_into_loops_particles_and_cavities():
    comp = _benchmark("conn_d_components").components
    assert comp(_rods(False)) == {"loops": 3, "particles": 1, "cavities": 0, "connectivity": 3}
    assert comp(_rods(True))["loops"] == 2
    speck = _rods(False)
    speck[12, 12, 12] = True  # a fragment: connectivity drops by one, the loops stay
    hollow = _rods(False)
    hollow[3, 12, 12] = False  # an enclosed cavity in a plate
    assert comp(speck) == {"loops": 3, "particles": 2, "cavities": 0, "connectivity": 2}
    assert comp(hollow) == {"loops": 3, "particles": 1, "cavities": 1, "connectivity": 2}


def _work_folder(tmp_path):
    """A fidelity work folder with one test specimen (a phantom, its LR at 0.1 mm) and one
    'model' that returns HR itself; returns the result file, the folder, HR and LR images."""
    import torchio as tio

    from bone3d.io import write_volume

    hr = make_phantom(shape=(48, 48, 48), spacing_mm=0.05, bv_tv=0.2, seed=3).image
    lr = tio.Resample(0.1)(hr)
    base = tmp_path / "w" / "hrpqct"
    write_volume(hr, base / "data" / "s1" / "hr.nii.gz")
    write_volume(lr, base / "data" / "s1" / "lr.nii.gz")
    write_volume(hr, base / "sr-ensemble" / "copy" / "s1.nii.gz")
    result = tmp_path / "r.json"
    result.write_text(json.dumps({"data": {"split": {"test": ["s1"]}}}))
    return result, tmp_path / "w", hr, lr


def test_conn_d_components_reads_a_fidelity_work_folder(tmp_path, capsys):
    """Methods are read from the work folder as fidelity.py writes it; a method equal to HR
    differs from it by nothing, trilinear LR (blurred) loses loops; a folder that is not a
    work folder is refused with exit 2."""
    import torchio as tio

    from bone3d.io import write_volume

    mod = _benchmark("conn_d_components")
    result, work, hr, lr = _work_folder(tmp_path)
    base = work / "hrpqct"
    out = tmp_path / "c.json"
    assert mod.main([str(result), str(tmp_path / "w"), "--json", str(out)]) == 0
    s = json.loads(out.read_text())
    assert set(s) == {"HR", "LR trilinear", "copy"}
    assert all(s["copy"][f"{t}_minus_hr_mean"] == 0 for t in mod.TERMS)
    assert s["LR trilinear"]["loops_minus_hr_mean"] < 0
    assert s["HR"]["n_voi"] == s["copy"]["n_voi"] >= 1
    with pytest.raises(SystemExit) as err:
        mod.main([str(result), str(tmp_path)])
    assert err.value.code == 2 and "sr-ensemble" in capsys.readouterr().err
    # --single-pass reads the single passes (sr/) instead: here LR on the HR grid, as a model
    write_volume(tio.Resample(hr)(lr), base / "sr" / "copy" / "s1.nii.gz")
    assert mod.main([str(result), str(tmp_path / "w"), "--single-pass", "--json", str(out)]) == 0
    single = json.loads(out.read_text())
    assert single["copy"]["loops_minus_hr_mean"] < 0 and single["HR"] == s["HR"]
    # --noise-free: the scanner model without noise; at 82 um and 0.12 mm FWHM the thinnest
    # trabeculae of the phantom fall below the threshold, so both references lose loops
    assert mod.main([str(result), str(tmp_path / "w"), "--noise-free", "--json", str(out)]) == 0
    ref = json.loads(out.read_text())
    assert {"HR blurred", "LR noise-free"} <= set(ref) and ref["HR"] == s["HR"]
    assert ref["HR blurred"]["loops_minus_hr_mean"] < 0
    assert ref["LR noise-free"]["loops"] <= ref["HR blurred"]["loops"]


def test_scanner_references_score_the_noise_free_scan_as_a_method(tmp_path, capsys):
    """The noise-free references are scored as the benchmark scores a method: a model equal
    to HR has no error; the scanner's PSF thickens trabeculae under the IsoData threshold
    (Tb.Th biased high) and the coarser LR grid more so; a folder that is not a work folder
    is refused with exit 2."""
    mod = _benchmark("scanner_references")
    result, _, _, _ = _work_folder(tmp_path)
    out = tmp_path / "s.json"
    assert mod.main([str(result), str(tmp_path / "w"), "--json", str(out)]) == 0
    s = json.loads(out.read_text())
    assert set(s) == {"HR blurred", "LR noise-free", "LR trilinear", "copy"}
    assert all(s["copy"][f"{p}_mare"] == 0 for p in ("bv_tv", "tb_th_mm", "da"))
    assert 0 < s["HR blurred"]["tb_th_mm_median_bias"] < s["LR noise-free"]["tb_th_mm_median_bias"]
    assert s["HR blurred"]["tb_th_mm_mare"] > 0.05
    with pytest.raises(SystemExit) as err:
        mod.main([str(result), str(tmp_path)])
    assert err.value.code == 2 and "sr-ensemble" in capsys.readouterr().err


def test_gan_stage_arguments_make_pix2pix_fine_tune_the_trained_generator(tmp_path):
    """``--gan-stage``: the arguments put the trained U-Net (not pix2pix's own generator) under
    pix2pix's conditional PatchGAN, loaded from its checkpoint when the stage starts, with the
    morphometry loss as the content term from the start; its rows are ``NAME+morpho+gan``. A
    post-upsampling generator is refused (the conditional D needs one grid)."""
    import torch
    from monai.bundle import ConfigParser
    from monai.handlers import CheckpointLoader

    from bone3d.engines import bundle_configs
    from bone3d.nets import build
    from bone3d.nets.unet import UNetSR

    fid = _fidelity()
    ckpt = tmp_path / "model.pt"
    torch.save(build("unet", 3, "tiny").state_dict(), ckpt)
    args = fid.gan_stage_args("unet_sr", str(ckpt))
    datalist = tmp_path / "datalist.json"
    meta = {"lr_range": [0, 1], "hr_range": [0, 1], "hr_spacing_mm": [0.05] * 3}
    datalist.write_text(json.dumps({**meta, "training": [], "validation": [], "test": []}))
    b = fid.ROOT / "bundles" / "pix2pix"
    parser = ConfigParser()
    parser.read_config(bundle_configs(b, "train", "3d", "morphometry_loss"))
    overrides = dict(zip(args[::2], args[1::2], strict=True))
    parser.update({"bundle_root": str(b), "datalist": str(datalist), "net_preset": "tiny",
                   "ckpt_dir": str(tmp_path / "stage"),
                   **{k.removeprefix("--"): v for k, v in overrides.items()}})  # fmt: skip
    assert isinstance(parser.get_parsed_content("network"), UNetSR)
    loader = parser.get_parsed_content(f"train#handlers#{len(parser['train#handlers']) - 1}")
    assert isinstance(loader, CheckpointLoader) and loader.load_path == str(ckpt)
    assert float(parser.get_parsed_content("learning_rate")) == 1e-4
    assert float(parser.get_parsed_content("morphometry_loss_pretrain")) == 0.0
    assert parser.get_parsed_content("loss_weights") == {"content": 100.0, "gan": 1.0, "fm": 0.0}
    info = {"bundle": "pix2pix", "variant": "3d", "morphometry_loss": True, "stage_of": "unet_sr"}
    assert fid._run_key(info) == "unet_sr-3d+morpho+gan"
    with pytest.raises(ValueError, match="pre-upsampling"):
        fid.gan_stage_args("rcan", str(ckpt))


def test_gan_stage_trial_trains_the_unet_3d_longer_and_stages_it(tmp_path, monkeypatch, capsys):
    """``--model-epochs unet_sr-3d=60 --gan-stage unet_sr`` (fidelity_gan_stage_60ep.json): the
    U-Net 3D trains 60 epochs, plain and +morpho alike, every other model 30; after each U-Net
    +morpho training (3D and 2.5D) the pix2pix GAN stage fine-tunes that training's own
    checkpoint 30 epochs; no other model gets a stage. Since 2026-11-24 that is the default; a
    post-upsampling model in ``--gan-stage``, or a malformed ``--model-epochs``, is refused
    (argparse, exit 2), and other values of either flag are trials."""
    fid = _fidelity()
    calls = []

    def fake_train(bundle, variant, morpho, datalist, run_dir, db, epochs, seed=0, extra=None,
                   patch_3d=32):  # fmt: skip
        calls.append((bundle, variant, morpho, epochs[variant], list(extra or [])))
        return {"bundle": bundle, "variant": variant, "morphometry_loss": morpho,
                "train_s": 1.0, "checkpoint": str(run_dir / "model.pt"), "run_name": "r"}  # fmt: skip

    class Trained(Exception):
        pass

    def stop(path):  # scoring starts after every training: stop there
        raise Trained

    datalist = tmp_path / "datalist.json"
    item = {"image": "lr.nii.gz", "target": "hr.nii.gz", "specimen": "s"}
    datalist.write_text(json.dumps({"training": [], "validation": [item], "test": [item]}))
    monkeypatch.setattr(fid, "DATA", tmp_path)
    monkeypatch.setattr(fid, "hr_volumes", lambda *a: [])
    monkeypatch.setattr(fid, "donor_split", lambda *a: {"test": [], "validation": [],
                                                        "training": []})  # fmt: skip
    monkeypatch.setattr(fid, "build_dataset", lambda *a: datalist)
    monkeypatch.setattr(fid, "train", fake_train)
    monkeypatch.setattr("bone3d.io.read_volume", stop)
    with pytest.raises(Trained):
        fid.main(["--degradations", "hrpqct", "--work", str(tmp_path / "w"), "--model-epochs",
                  "unet_sr-3d=60", "--gan-stage", "unet_sr", "--out", str(tmp_path / "f.json")])  # fmt: skip
    epochs = {(b, v, m): n for b, v, m, n, x in calls if "--pretrained_g" not in x}
    assert epochs[("unet_sr", "3d", False)] == epochs[("unet_sr", "3d", True)] == 60
    assert {n for (b, v, m), n in epochs.items() if (b, v) != ("unet_sr", "3d")} == {30}
    assert len(epochs) == 12
    stages = [(v, n, x) for b, v, m, n, x in calls if "--pretrained_g" in x]
    assert [(v, n) for v, n, x in stages] == [("3d", 30), ("2p5d", 30)]
    for v, _, x in stages:  # its own variant's +morpho checkpoint, the U-Net's network
        run = tmp_path / "w" / "hrpqct" / "runs" / f"unet_sr-{v}-morpho"
        assert x[x.index("--pretrained_g") + 1] == str(run / "model.pt")
        assert x[x.index("--model_name") + 1] == "unet"
    # the stage follows its generator's training at once, under the pix2pix bundle
    i = calls.index(next(c for c in calls if "--pretrained_g" in c[4]))
    assert calls[i - 1][:3] == ("unet_sr", "3d", True) and calls[i][0] == "pix2pix"
    calls.clear()
    with pytest.raises(Trained):
        fid.main(
            [
                "--degradations",
                "hrpqct",
                "--models",
                "unet_sr",
                "--variants",
                "3d",
                "--work",
                str(tmp_path / "w2"),
            ]
        )  # fmt: skip  (the defaults)
    # the defaults are that setting: the U-Net 3D 60 epochs, then the stage on its + loss model
    assert [(b, n) for b, v, m, n, x in calls] == [
        ("unet_sr", 60),
        ("unet_sr", 60),
        ("pix2pix", 30),
    ]
    for bad in (["--gan-stage", "rcan"], ["--model-epochs", "unet_sr-3d=0"]):
        with pytest.raises(SystemExit) as err:
            fid.main([*bad, "--out", str(tmp_path / "f.json")])
        assert err.value.code == 2
    for trial in (["--gan-stage"], ["--model-epochs", "unet_sr-3d=90"]):
        with pytest.raises(SystemExit) as err:  # without --out: refused
            fid.main(trial)
        assert err.value.code == 2 and "is a trial" in capsys.readouterr().err
