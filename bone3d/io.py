"""Read and write bone volumes with their physical geometry.

A volume in bone3d is a TorchIO ``Image`` (``ScalarImage`` for grey values, ``LabelMap`` for masks
and segmentations): a ``(1, X, Y, Z)`` tensor plus a 4×4 affine in millimetres (RAS+, the nibabel
convention TorchIO uses). ``image.spacing`` is the voxel size in mm along the three array axes; the
third array axis is the scanner's slice (z) axis.

Formats read: NIfTI (``.nii``, ``.nii.gz``), NRRD (``.nrrd``, ``.nhdr``), MetaImage (``.mha``,
``.mhd``), a DICOM series (a folder), and TIFF stacks (one multi-page file or a folder of 2D
slices; TIFF carries no trustworthy spacing, so ``spacing=`` is required). Reading is done by
TorchIO (nibabel for NIfTI, SimpleITK for the rest) and tifffile; this module adds the checks
that turn bad input into one clear `InputError` instead of a wrong number later on.

Writing (NIfTI, MetaImage, NRRD) is atomic: the volume goes to a temporary file beside the
target, which is renamed over the target only once complete, so a killed process never leaves a
half-written file that looks finished. A path that this process has read as an input is never
written to.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
import SimpleITK as sitk
import tifffile
import torch
import torchio as tio

from bone3d.errors import InputError

VOLUME_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")
WRITE_SUFFIXES = (".nii.gz", ".nii", ".mha", ".nrrd")
TIFF_SUFFIXES = (".tif", ".tiff")

# ITK's C++ warnings go straight to stderr; the checks below report what matters instead.
sitk.ProcessObject_SetGlobalWarningDisplay(False)

# Paths read as inputs by this process; write_volume refuses to replace any of them.
_INPUTS: set[Path] = set()


def suffix_of(path: str | os.PathLike) -> str:
    """Lower-case file suffix, treating ``.nii.gz`` as one suffix."""
    name = Path(path).name.lower()
    if name.endswith(".nii.gz"):
        return ".nii.gz"
    return Path(name).suffix


def _resolved(path: str | os.PathLike) -> Path:
    return Path(path).expanduser().resolve()


def protect(path: str | os.PathLike) -> None:
    """Mark ``path`` as an input that `write_volume` must never overwrite."""
    _INPUTS.add(_resolved(path))


# --------------------------------------------------------------------------------------------
# reading
# --------------------------------------------------------------------------------------------


def read_volume(
    path: str | os.PathLike,
    *,
    spacing: Sequence[float] | None = None,
    label: bool = False,
) -> tio.Image:
    """Read a 3D volume with its spacing (mm) and orientation.

    Args:
        path: a volume file, a DICOM series folder, a TIFF stack file or a folder of TIFF slices.
        spacing: voxel size (x, y, z) in mm. Required for TIFF; for other formats it replaces the
            file's spacing (keeping origin and direction), e.g. for NRRDs written without one.
        label: return a ``tio.LabelMap`` (masks, segmentations) instead of a ``tio.ScalarImage``.

    Returns:
        a loaded TorchIO image, data ``(1, X, Y, Z)``.

    Raises:
        InputError: missing/unreadable/corrupt file, not 3D, several channels, empty, NaN/inf
            voxels, or zero/negative/missing spacing. The message names the file.
    """
    p = Path(path).expanduser()
    if not p.exists():
        raise InputError(p, "no such file or folder")
    with warnings.catch_warnings():
        # nibabel/ITK warn about odd headers before failing or fixing them silently; the checks
        # here turn what matters into an InputError, so their warnings are noise for a user.
        warnings.simplefilter("ignore")
        image = _read_any(p, spacing, label)
    protect(p)
    return image


def _read_any(p: Path, spacing, label: bool) -> tio.Image:
    image_cls = tio.LabelMap if label else tio.ScalarImage
    if p.is_dir():
        if _tiff_files(p):
            image = _read_tiff(p, spacing, image_cls)
        else:
            image = _read_dicom_series(p, image_cls)
    else:
        suffix = suffix_of(p)
        if suffix in TIFF_SUFFIXES:
            image = _read_tiff(p, spacing, image_cls)
        elif suffix in VOLUME_SUFFIXES:
            if spacing is None:
                _check_header_spacing(p, suffix)
            image = _load(image_cls, p)
        else:
            raise InputError(
                p,
                f"unsupported format {suffix or '(no suffix)'}; expected one of "
                f"{', '.join(VOLUME_SUFFIXES + TIFF_SUFFIXES)}, a DICOM folder or a TIFF folder",
            )
    if spacing is not None:
        image = with_spacing(image, spacing, source=p)
    check_image(image, p)
    return image


def _check_nifti_header(p: Path) -> None:
    """Check the *raw* NIfTI header (nibabel and ITK silently replace zero pixdim with 1)."""
    try:
        with nib.openers.ImageOpener(str(p)) as fh:
            head = fh.read(4)
            sizes = {int.from_bytes(head, "little"), int.from_bytes(head, "big")}
            if len(head) < 4 or not sizes & {348, 540}:
                raise ValueError("not a NIfTI header (corrupt file?)")
            fh.seek(0)
            cls = nib.Nifti2Header if 540 in sizes else nib.Nifti1Header
            hdr = cls.from_fileobj(fh, check=False)
        if bytes(hdr["magic"])[:3] not in (b"n+1", b"ni1", b"n+2", b"ni2"):
            raise ValueError(f"bad NIfTI magic {bytes(hdr['magic'])!r} (corrupt file?)")
    except Exception as err:
        raise InputError(p, f"cannot read: {_short(err)}") from None
    if hdr["sform_code"] > 0:
        srow = np.stack([hdr["srow_x"], hdr["srow_y"], hdr["srow_z"]]).astype(float)
        sp = np.linalg.norm(srow[:, :3], axis=0)
    else:
        sp = np.asarray(hdr["pixdim"][1:4], dtype=float)
    ndim = int(hdr["dim"][0])
    if np.any(~np.isfinite(sp[: max(1, min(ndim, 3))])) or np.any(sp[: max(1, min(ndim, 3))] <= 0):
        raise InputError(p, f"zero, negative or invalid voxel spacing {tuple(sp.tolist())}")


def _read_nifti(path) -> tuple[torch.Tensor, np.ndarray]:
    """TorchIO reader for NIfTI through nibabel, keeping voxel values exactly as stored.

    (TorchIO's default goes through ITK, whose NIfTI reader turns NaN voxels into 0, which would
    hide corrupt data from the NaN check.)
    """
    img = nib.load(str(path))
    arr = np.asanyarray(img.dataobj)
    if arr.ndim == 5 and arr.shape[3] == 1:  # (X, Y, Z, T=1, C)
        arr = arr[:, :, :, 0]
    if arr.ndim == 3:
        arr = arr[None]
    elif arr.ndim == 4:
        arr = np.moveaxis(arr, -1, 0)
    else:
        raise InputError(path, f"expected a 3D volume, got {arr.ndim}D shape {arr.shape}")
    if arr.dtype == np.float64:
        arr = arr.astype(np.float32)
    return torch.from_numpy(np.ascontiguousarray(arr)), np.asarray(img.affine, dtype=float)


def _load(image_cls, p: Path) -> tio.Image:
    try:
        if suffix_of(p) in (".nii", ".nii.gz"):
            image = image_cls(p, reader=_read_nifti)
        else:
            image = image_cls(p)
        image.load()
    except InputError:
        raise
    except Exception as err:  # the readers raise many types for corrupt or truncated files
        raise InputError(p, f"cannot read: {_short(err)}") from None
    return image


def _short(err: Exception) -> str:
    text = " ".join(str(err).split())
    return (text[:200] + "...") if len(text) > 200 else (text or type(err).__name__)


def _check_header_spacing(p: Path, suffix: str) -> None:
    """Refuse files whose header does not state a voxel size (readers silently assume 1 mm)."""
    if suffix in (".nii", ".nii.gz"):
        _check_nifti_header(p)
        return
    # NRRD and MetaImage are text headers: look for the spacing fields themselves, because
    # ITK fills in 1.0 when they are absent.
    try:
        reader = sitk.ImageFileReader()
        reader.SetFileName(str(p))
        reader.ReadImageInformation()
    except Exception as err:
        raise InputError(p, f"cannot read: {_short(err)}") from None
    header = _text_header(p)
    if suffix in (".nrrd", ".nhdr"):
        keys = ("space directions:", "spacings:")
    else:
        keys = ("elementspacing", "elementsize")
    if header is not None and not any(k in header for k in keys):
        raise InputError(
            p, "header carries no voxel spacing (ITK would assume 1 mm); pass spacing=(x, y, z)"
        )
    sp = np.asarray(reader.GetSpacing(), dtype=float)
    if np.any(~np.isfinite(sp)) or np.any(sp <= 0):
        raise InputError(p, f"zero, negative or invalid voxel spacing {tuple(sp.tolist())}")


def _text_header(p: Path) -> str | None:
    """The lower-cased text header of a NRRD/MetaImage file (up to the data), or None."""
    with open(p, "rb") as fh:
        head = fh.read(65536)
    text = head.split(b"\n\n", 1)[0] if p.suffix.lower() in (".nrrd", ".nhdr") else head
    try:
        lines = text.decode("latin-1").lower().splitlines()
    except Exception:
        return None
    keep = []
    for line in lines:
        keep.append(line)
        if line.startswith("elementdatafile"):
            break
    return "\n".join(keep)


def _tiff_files(folder: Path) -> list[Path]:
    return sorted(f for f in folder.iterdir() if suffix_of(f) in TIFF_SUFFIXES)


def _read_tiff(p: Path, spacing, image_cls) -> tio.Image:
    if spacing is None:
        raise InputError(
            p, "TIFF stacks carry no reliable voxel spacing; pass spacing=(x, y, z) mm"
        )
    try:
        if p.is_dir():
            files = _tiff_files(p)
            slices = [tifffile.imread(f) for f in files]
            shapes = {s.shape for s in slices}
            if len(shapes) != 1:
                raise InputError(p, f"TIFF slices differ in shape: {sorted(shapes)}")
            arr = np.stack(slices, axis=0)
        else:
            arr = tifffile.imread(p)
    except InputError:
        raise
    except Exception as err:
        raise InputError(p, f"cannot read: {_short(err)}") from None
    if arr.ndim != 3:
        raise InputError(p, f"expected a 3D stack (slices, rows, columns), got shape {arr.shape}")
    # tifffile gives (z, y, x); bone3d arrays are (x, y, z)
    arr = np.ascontiguousarray(np.transpose(arr, (2, 1, 0)))
    return image_cls(
        tensor=torch.from_numpy(arr)[None], affine=np.diag([*_spacing3(spacing, p), 1])
    )


def _read_dicom_series(p: Path, image_cls) -> tio.Image:
    try:
        ids = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(p))
    except Exception as err:
        raise InputError(p, f"cannot read DICOM folder: {_short(err)}") from None
    if not ids:
        raise InputError(p, "folder holds neither a DICOM series nor TIFF slices")
    if len(ids) > 1:
        raise InputError(p, f"folder holds {len(ids)} DICOM series; give one series per folder")
    files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(p), ids[0])
    probe = sitk.ImageFileReader()
    probe.SetFileName(files[0])
    try:
        probe.ReadImageInformation()
    except Exception as err:
        raise InputError(files[0], f"cannot read: {_short(err)}") from None
    if not probe.HasMetaDataKey("0028|0030") and not probe.HasMetaDataKey("0018|1164"):
        raise InputError(p, "DICOM series has no PixelSpacing (0028,0030); pass spacing=(x, y, z)")
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files)
    try:
        img = reader.Execute()
    except Exception as err:
        raise InputError(p, f"cannot read DICOM series: {_short(err)}") from None
    if img.GetDimension() != 3 or img.GetSize()[2] < 2:
        raise InputError(p, f"DICOM series is not a 3D volume (size {img.GetSize()})")
    return (
        image_cls.from_sitk(img) if hasattr(image_cls, "from_sitk") else _from_sitk(img, image_cls)
    )


def _from_sitk(img: sitk.Image, image_cls) -> tio.Image:
    tensor, affine = tio.io.sitk_to_nib(img)
    return image_cls(tensor=tensor, affine=affine)


# --------------------------------------------------------------------------------------------
# checks and construction
# --------------------------------------------------------------------------------------------


def _spacing3(spacing, source) -> np.ndarray:
    try:
        sp = np.asarray(spacing, dtype=float).reshape(-1)
    except (TypeError, ValueError):
        raise InputError(source, f"spacing must be three numbers in mm, got {spacing!r}") from None
    if sp.size == 1:
        sp = np.repeat(sp, 3)
    if sp.size != 3:
        raise InputError(source, f"spacing must be three numbers in mm, got {spacing!r}")
    if np.any(~np.isfinite(sp)) or np.any(sp <= 0):
        raise InputError(source, f"spacing must be positive and finite, got {tuple(sp.tolist())}")
    return sp


def with_spacing(image: tio.Image, spacing, *, source=None) -> tio.Image:
    """Return ``image`` with its voxel size replaced by ``spacing`` (mm), keeping origin and axes."""
    sp = _spacing3(spacing, source)
    affine = np.array(image.affine, dtype=float)
    norms = np.linalg.norm(affine[:3, :3], axis=0)
    norms[norms == 0] = 1.0
    affine[:3, :3] = affine[:3, :3] / norms * sp
    return type(image)(tensor=image.data, affine=affine)


def check_array(data, source, *, ndim: int = 3) -> None:
    """Raise `InputError` unless ``data`` is a finite, non-empty ``ndim``-D array."""
    arr = data.numpy() if isinstance(data, torch.Tensor) else np.asarray(data)
    if arr.ndim != ndim:
        raise InputError(source, f"expected a {ndim}D volume, got {arr.ndim}D shape {arr.shape}")
    if arr.size == 0 or min(arr.shape) == 0:
        raise InputError(source, f"empty volume (shape {arr.shape})")
    if arr.dtype.kind == "f" and not np.isfinite(arr).all():
        n = int((~np.isfinite(arr)).sum())
        raise InputError(source, f"{n} voxel(s) are NaN or infinite")


def check_image(image: tio.Image, source) -> None:
    """Validate a loaded TorchIO image: one channel, 3D with >1 voxel per axis, finite, spaced."""
    data = image.data
    if data.ndim != 4:
        raise InputError(source, f"expected a 3D volume, got data of shape {tuple(data.shape)}")
    if data.shape[0] != 1:
        raise InputError(
            source, f"expected one channel, got {data.shape[0]} (a 4D or vector image?)"
        )
    spatial = tuple(data.shape[1:])
    if 0 in spatial:
        raise InputError(source, f"empty volume (shape {spatial})")
    if sum(s > 1 for s in spatial) < 3:
        raise InputError(source, f"expected a 3D volume, got shape {spatial} (a 2D image?)")
    check_array(data[0], source)
    sp = np.asarray(image.spacing, dtype=float)
    if np.any(~np.isfinite(sp)) or np.any(sp <= 0):
        raise InputError(source, f"zero, negative or invalid voxel spacing {tuple(sp.tolist())}")
    if abs(np.linalg.det(np.asarray(image.affine)[:3, :3])) <= 0:
        raise InputError(source, "degenerate orientation matrix")


def make_image(
    array,
    *,
    spacing: Sequence[float] | None = None,
    affine: np.ndarray | None = None,
    label: bool = False,
) -> tio.Image:
    """Wrap an ``(X, Y, Z)`` array as a TorchIO image with ``affine`` or diagonal ``spacing`` (mm)."""
    if (spacing is None) == (affine is None):
        raise ValueError("give exactly one of spacing or affine")
    if affine is None:
        affine = np.diag([*_spacing3(spacing, "spacing"), 1.0])
    arr = (
        array if isinstance(array, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(array))
    )
    cls = tio.LabelMap if label else tio.ScalarImage
    return cls(tensor=arr[None], affine=np.asarray(affine, dtype=float))


# --------------------------------------------------------------------------------------------
# writing
# --------------------------------------------------------------------------------------------


def write_volume(image: tio.Image, path: str | os.PathLike) -> Path:
    """Write ``image`` atomically (temp file + rename) to NIfTI, MetaImage or NRRD.

    Refuses paths this process read as inputs (see `protect`). Parent folders are created.

    Returns:
        the written path.

    Raises:
        InputError: unsupported suffix, path is an input or a folder, or the folder is not
            writable. Nothing is left at ``path`` when writing fails.
    """
    target = Path(path).expanduser()
    suffix = suffix_of(target)
    if suffix not in WRITE_SUFFIXES:
        raise InputError(target, f"cannot write {suffix or '(no suffix)'}; use {WRITE_SUFFIXES}")
    if _resolved(target) in _INPUTS:
        raise InputError(target, "refusing to overwrite an input volume")
    if target.is_dir():
        raise InputError(target, "is a folder, expected a file path")
    check_image(image, target)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(
            prefix=f".{target.name}.", suffix=f".part{suffix}", dir=target.parent
        )
        os.close(fd)
    except OSError as err:
        raise InputError(target.parent, f"cannot write here: {err.strerror or err}") from None
    try:
        image.save(tmp, squeeze=True)
        os.replace(tmp, target)
    except Exception as err:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(err, OSError):
            raise InputError(target, f"cannot write: {err.strerror or err}") from None
        raise
    return target


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temporary path beside ``path`` (same suffix); rename it over ``path`` on success.

    The one mechanism behind every non-volume writer (JSON, CSV, text, figures, transforms,
    checkpoints of helper networks): parent folders are created, paths read as inputs are
    refused, and a failure removes the temporary file and leaves ``path`` untouched.
    """
    path = Path(path).expanduser()
    if _resolved(path) in _INPUTS:
        raise InputError(path, "refusing to overwrite an input")
    if path.is_dir():
        raise InputError(path, "is a folder, expected a file path")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise InputError(path.parent, f"cannot write here: {err.strerror or err}") from None
    tmp = path.with_name(f".{path.stem}.part{path.suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise InputError(path, f"cannot write: {err.strerror or err}") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


class _SlabWriter:
    """Writes whole z slabs of a Fortran-ordered float32 NIfTI body with positioned writes.

    A z slab of an (X, Y, Z) Fortran array is one contiguous byte range, so each slab is a single
    ``os.pwrite``. Unlike a memory map, written pages stay in the page cache, not in the
    process's resident memory, so RSS does not grow with the output.
    """

    def __init__(self, fd: int, offset: int, shape):
        self.fd, self.offset, self.shape = fd, int(offset), tuple(int(n) for n in shape)

    def __setitem__(self, key, value) -> None:
        _, _, zs = key
        block = np.asarray(value, dtype=np.float32)
        pos = self.offset + zs.start * self.shape[0] * self.shape[1] * 4
        data = block.tobytes(order="F")
        while data:
            n = os.pwrite(self.fd, data, pos)
            data, pos = data[n:], pos + n


def _nifti_header(shape, affine) -> nib.Nifti1Header:
    hdr = nib.Nifti1Header()
    hdr.set_data_shape(tuple(int(s) for s in shape))
    hdr.set_data_dtype(np.float32)
    hdr.set_qform(affine, code=1)
    hdr.set_sform(affine, code=1)
    hdr.set_xyzt_units("mm")
    hdr["vox_offset"] = 352  # single-file NIfTI-1: 348-byte header + 4-byte extension flag
    return hdr


@contextlib.contextmanager
def nifti_slab_writer(path: str | os.PathLike, shape, affine):
    """Write a float32 ``(X, Y, Z)`` NIfTI z slab by z slab: ``out[:, :, z0:z1] = block``.

    For volumes too large to hold in memory (whole-stack inference, LR resampled onto a
    micro-CT grid). The data go to ``.<name>.part.nii`` beside the target; a ``.nii.gz`` target
    is compressed in a streamed pass (gzip level 1); the target appears by an atomic rename only
    when the block exits without error, and a failure removes the partial files. Paths read as
    inputs are refused, as by `write_volume`.
    """
    import gzip
    import shutil

    target = Path(path).expanduser()
    suffix = suffix_of(target)
    if suffix not in (".nii", ".nii.gz"):
        raise InputError(target, "streaming writes NIfTI (.nii or .nii.gz)")
    if _resolved(target) in _INPUTS:
        raise InputError(target, "refusing to overwrite an input volume")
    hdr = _nifti_header(shape, np.asarray(affine, float))
    offset = int(hdr["vox_offset"])
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, part = tempfile.mkstemp(
            prefix=f".{target.name}.", suffix=".part.nii", dir=target.parent
        )
        os.close(fd)
    except OSError as err:
        raise InputError(target.parent, f"cannot write here: {err.strerror or err}") from None
    part = Path(part)
    try:
        with open(part, "wb") as fh:
            hdr.write_to(fh)
            fh.write(b"\0" * (offset - fh.tell()))
            fh.truncate(offset + int(np.prod(shape)) * 4)
        fd_out = os.open(part, os.O_WRONLY)
        try:
            yield _SlabWriter(fd_out, offset, shape)
            os.fsync(fd_out)
        finally:
            os.close(fd_out)
        if suffix == ".nii.gz":
            fd, gz = tempfile.mkstemp(
                prefix=f".{target.name}.", suffix=".part.nii.gz", dir=target.parent
            )
            os.close(fd)
            try:
                with open(part, "rb") as src, gzip.open(gz, "wb", compresslevel=1) as dst:
                    shutil.copyfileobj(src, dst, length=64 << 20)
                os.replace(gz, target)
            except BaseException:
                Path(gz).unlink(missing_ok=True)
                raise
            part.unlink()
        else:
            os.replace(part, target)
    except OSError as err:
        part.unlink(missing_ok=True)
        raise InputError(target, f"cannot write: {err.strerror or err}") from None
    except BaseException:
        part.unlink(missing_ok=True)
        raise


def write_text(text: str, path: str | os.PathLike) -> Path:
    """Write UTF-8 text atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path).expanduser()


def write_json(obj, path: str | os.PathLike) -> Path:
    """Write ``obj`` as indented JSON atomically (temp file + rename); parent folders created.

    NumPy scalars are written as plain numbers. Refuses paths read as inputs.
    """
    import json

    return write_text(json.dumps(obj, indent=2, default=float), path)


def write_csv(rows, path: str | os.PathLike, header: Sequence[str] | None = None) -> Path:
    """Write CSV atomically: ``rows`` are lists (with ``header``) or dicts (header = their keys)."""
    import csv

    rows = list(rows)
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as fh:
        if rows and isinstance(rows[0], dict):
            w = csv.DictWriter(fh, fieldnames=list(header or rows[0]))
            w.writeheader()
            w.writerows(rows)
        else:
            w = csv.writer(fh)
            if header is not None:
                w.writerow(list(header))
            w.writerows(rows)
    return Path(path).expanduser()


def write_figure(fig, path: str | os.PathLike, dpi: int = 90) -> Path:
    """Save a matplotlib figure atomically as PNG and close it."""
    import matplotlib.pyplot as plt

    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=dpi, format="png")
    finally:
        plt.close(fig)
    return Path(path).expanduser()


def spacing_of(image: tio.Image) -> tuple[float, float, float]:
    """Voxel size (mm) along the three array axes."""
    return tuple(float(s) for s in image.spacing)
