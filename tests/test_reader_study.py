"""Reader-study round trip: export a blinded set, fill synthetic sheets, analyse them."""

from __future__ import annotations

import csv

import numpy as np
import pytest
from scipy import stats as sps

from bone3d.cli import main
from bone3d.errors import InputError
from bone3d.evaluation.reader_study import CRITERIA, analyse_study, export_study
from bone3d.io import make_image, write_volume


@pytest.fixture
def study(tmp_path):
    rng = np.random.default_rng(0)
    pairs = []
    for _ in range(2):
        hr = rng.normal(0, 1, (32, 32, 20)).astype(np.float32)
        pairs.append((hr, hr + rng.normal(0, 0.5, hr.shape).astype(np.float32)))
    info = export_study(pairs, tmp_path / "s", n_slices=4, seed=3)
    with open(tmp_path / "s" / "key.csv", newline="") as fh:
        key = list(csv.DictReader(fh))
    return tmp_path / "s", info, key


def _sheet(path, key, score):
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["id", *CRITERIA])
        for row in reversed(key):  # observers may return rows in any order
            w.writerow([row["id"], *[score(row, c) for c in CRITERIA]])
    return path


def test_export_is_blinded_and_complete(study):
    folder, info, key = study
    assert info["images"] == 16 and len(key) == 16
    assert sum(r["source"] == "HR" for r in key) == 8
    pngs = sorted(p.stem for p in (folder / "images").glob("*.png"))
    assert pngs == sorted(r["id"] for r in key)
    sheet = (folder / "score_sheet.csv").read_text()
    assert "HR" not in sheet and "generated" not in sheet  # the sheet does not reveal the source
    # shuffled: the key is not HR/generated alternating in export order
    sources = [r["source"] for r in key]
    assert sources != ["HR", "generated"] * 8


def test_analysis_gives_the_right_w_and_p(study, tmp_path):
    folder, _, key = study
    rng = np.random.default_rng(1)
    base = {r["id"]: (4 if r["source"] == "HR" else 2) + int(rng.integers(0, 2)) for r in key}

    def agree(row, c):
        lo, hi = CRITERIA[c]
        return int(np.clip(base[row["id"]], lo, hi))

    def reverse(row, c):  # the mirror image of `agree` on each scale
        lo, hi = CRITERIA[c]
        return lo + hi - agree(row, c)

    same = [_sheet(tmp_path / f"o{i}.csv", key, agree) for i in range(3)]
    res = analyse_study(folder / "key.csv", same)
    for c in CRITERIA:
        assert res["criteria"][c]["kendalls_w"]["w"] == pytest.approx(1.0)  # identical observers
    # Mann-Whitney on each image's mean score, as scipy computes it
    hr = [agree(r, "texture") for r in key if r["source"] == "HR"]
    gen = [agree(r, "texture") for r in key if r["source"] != "HR"]
    ref = sps.mannwhitneyu(hr, gen, alternative="two-sided")
    mw = res["criteria"]["texture"]["mann_whitney"]
    assert mw["p"] == pytest.approx(ref.pvalue) and mw["u"] == pytest.approx(ref.statistic)
    assert mw["median_hr"] > mw["median_generated"] and mw["p"] < 0.01
    # two observers with mirrored scores have constant rank sums: W = 0 exactly
    opposed = [_sheet(tmp_path / "a.csv", key, agree), _sheet(tmp_path / "b.csv", key, reverse)]
    res2 = analyse_study(folder / "key.csv", opposed)
    assert res2["criteria"]["texture"]["kendalls_w"]["w"] == pytest.approx(0.0, abs=1e-12)


def test_bad_sheets_are_refused(study, tmp_path):
    folder, _, key = study
    good = _sheet(tmp_path / "g.csv", key, lambda r, c: 1)
    bad = _sheet(tmp_path / "b.csv", key, lambda r, c: 9)
    with pytest.raises(InputError, match="outside"):
        analyse_study(folder / "key.csv", [good, bad])
    short = tmp_path / "short.csv"
    short.write_text("id," + ",".join(CRITERIA) + "\n" + key[0]["id"] + ",1,1,1,1,1\n")
    with pytest.raises(InputError, match="no scores"):
        analyse_study(folder / "key.csv", [good, short])
    with pytest.raises(InputError, match="two observers"):
        analyse_study(folder / "key.csv", [good])


def test_cli_round_trip(tmp_path, capsys):
    rng = np.random.default_rng(2)
    hr = rng.normal(0, 1, (24, 24, 12)).astype(np.float32)
    h = write_volume(make_image(hr, spacing=(0.05,) * 3), tmp_path / "hr.nii.gz")
    g = write_volume(make_image(hr * 0.5, spacing=(0.05,) * 3), tmp_path / "sr.nii.gz")
    out = tmp_path / "study"
    assert (
        main(["reader-study", "export", "--hr", str(h), "--generated", str(g), "-o", str(out)]) == 0
    )
    with open(out / "key.csv", newline="") as fh:
        key = list(csv.DictReader(fh))
    sheets = [
        str(
            _sheet(
                tmp_path / f"s{i}.csv",
                key,
                lambda r, c, i=i: 1 + (r["source"] == "HR") + (i and c != "contrast"),
            )
        )
        for i in range(2)
    ]
    code = main(
        [
            "reader-study",
            "analyse",
            "--key",
            str(out / "key.csv"),
            "--sheets",
            *sheets,
            "-o",
            str(tmp_path / "r.json"),
        ]
    )
    assert code == 0
    assert "texture" in capsys.readouterr().out
    assert (tmp_path / "r.json").is_file()
