"""Reading the real bone volumes in ../shared/data (kept outside this repository)."""

from __future__ import annotations

import numpy as np
import pytest

from bone3d.data.simulate import degrade
from bone3d.errors import InputError
from bone3d.io import read_volume

pytestmark = pytest.mark.realdata


def test_lhdl_micro_ct_reads_with_its_spacing(shared_data):
    img = read_volume(
        shared_data / "lhdl_human_trabecular_uct" / "LHDL_3155_D_4_bc_200cube_19p5um.nii.gz"
    )
    assert img.spatial_shape == (200, 200, 200)
    np.testing.assert_allclose(img.spacing, (0.0195,) * 3, rtol=1e-5)


def test_bonebox_nrrd_without_spacing_is_refused_then_read_with_one(shared_data):
    path = shared_data / "bonebox_l1_trabecular_rois" / "isodata_04216_roi_0.nrrd"
    with pytest.raises(InputError, match="no voxel spacing"):
        read_volume(path)
    img = read_volume(path, spacing=(0.05, 0.05, 0.05))
    assert img.spatial_shape == (201, 201, 201)
    np.testing.assert_allclose(img.spacing, (0.05,) * 3)


def test_shrew_nrrd_and_nifti_agree(shared_data):
    a = read_volume(shared_data / "bonej_shrew_trabecular_seg" / "Shrew.nrrd")
    b = read_volume(shared_data / "bonej_shrew_trabecular_seg" / "Shrew.nii.gz")
    np.testing.assert_allclose(a.spacing, (0.0041,) * 3, rtol=1e-4)
    assert a.spatial_shape == b.spatial_shape
    bv = (a.data.numpy() > 0).mean()
    assert bv == pytest.approx(0.293, abs=0.001)  # PROVENANCE.md
    assert bv == pytest.approx((b.data.numpy() > 0).mean())


def test_clinical_ct_reads_in_hu(shared_data):
    img = read_volume(
        shared_data / "totalseg_clinical_ct_thoracolumbar" / "totalseg_example_ct_dicom_HU.nii.gz"
    )
    np.testing.assert_allclose(img.spacing, (0.977, 0.977, 2.0), atol=2e-3)
    data = img.data.numpy()
    assert data.min() >= -1024 and data.max() <= 3100


def test_lhdl_degraded_to_hrpqct(shared_data):
    hr = read_volume(
        shared_data / "lhdl_human_trabecular_uct" / "LHDL_3155_D_4_bc_200cube_19p5um.nii.gz"
    )
    d = degrade(hr, "hrpqct", intensity_map=(40.0, 200.0))
    np.testing.assert_allclose(d.image.spacing, (0.082,) * 3, rtol=1e-6)
    assert d.image.spatial_shape == (47, 47, 47)  # floor(200 * 0.0195 / 0.082)
