"""TorchIO subjects, transforms and patch queues for paired LR/HR training.

One path for data: a datalist entry becomes a ``tio.Subject`` with ``image`` (LR) and ``target``
(HR) ``ScalarImage``s that carry spacing and affine; `pair_transform` puts the LR on the model's
input grid and maps both to [0, 1] with fixed windows; a ``tio.Queue`` samples paired patches.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torchio as tio
from torch.utils.data import DataLoader

from bone3d.data.datalist import datalist_items, datalist_meta
from bone3d.data.simulate import hr_grid_for
from bone3d.errors import InputError
from bone3d.io import read_volume


def load_subjects(datalist: str, split: str) -> list[tio.Subject]:
    """Read every volume of one split of a datalist (validated by `bone3d.io.read_volume`).

    A simulated pair's ``degradation.json`` (beside its LR file, written by ``bone3d prepare``)
    adds ``kernel_code`` (`bone3d.data.simulate.kernel_code`, float32 (4,)), the supervision of
    DAN's kernel estimator; real pairs have none."""
    import json
    from pathlib import Path

    from bone3d.data.simulate import kernel_code

    lr_range = datalist_meta(datalist).get("lr_range")
    subjects = []
    for item in datalist_items(datalist, split):
        images = {}
        for key in ("image", "target"):  # unpaired training entries may hold one of them
            if item.get(key):
                images[key] = read_volume(item[key])
        if "image" not in images and split != "training":
            raise InputError(datalist, f"{split} entry {item.get('specimen')!r} has no image")
        extra = {}
        record = Path(item["image"]).parent / "degradation.json" if "image" in images else None
        if record is not None and record.is_file() and lr_range is not None:
            code = kernel_code(json.loads(record.read_text()), lr_range)
            extra["kernel_code"] = torch.tensor(code, dtype=torch.float32)
        subjects.append(tio.Subject(**images, specimen=item["specimen"], **extra))
    return subjects


def intensity_transform(lr_range: Sequence[float], hr_range: Sequence[float] | None) -> tio.Compose:
    """Map the LR window (and the HR window, for ``target``) linearly to [0, 1] (not clipped)."""
    ts = [tio.RescaleIntensity(out_min_max=(0, 1), in_min_max=tuple(lr_range), include=["image"])]
    if hr_range is not None:
        ts.append(
            tio.RescaleIntensity(out_min_max=(0, 1), in_min_max=tuple(hr_range), include=["target"])
        )
    return tio.Compose(ts)


def to_hr_grid(hr_spacing_mm: Sequence[float]) -> tio.Transform:
    """Resample the LR ``image`` (trilinear) onto the HR grid of its own field of view.

    The grid is `bone3d.data.simulate.hr_grid_for` (same corner, whole HR voxels), i.e. exactly
    the grid of the paired HR crop, so ``image`` and ``target`` line up voxel for voxel.
    """

    class _ToHRGrid(tio.SpatialTransform):
        def apply_transform(self, subject: tio.Subject) -> tio.Subject:
            lr = subject["image"]
            shape, affine = hr_grid_for(lr, hr_spacing_mm)
            resampled = tio.Resample(
                (shape, affine), image_interpolation="linear", include=["image"]
            )
            return resampled(subject)

    return _ToHRGrid()


def lr_working_grid(lr: tio.Image, hr_spacing_mm, scale: int):
    """The grid a post-upsampling model reads: spacing ``scale x`` the HR spacing, the LR field's
    corner, ``floor(HR shape / scale)`` voxels, so that its ``scale``-fold up-sampling is exactly
    the HR grid of `hr_grid_for` (cut to whole multiples of ``scale``). Returns (shape, affine)."""
    import numpy as np

    s = int(scale)
    hr_shape, hr_affine = hr_grid_for(lr, hr_spacing_mm)
    shape = tuple(n // s for n in hr_shape)
    if min(shape) < 1:
        raise ValueError(f"LR field of {hr_shape} HR voxels is smaller than scale {s}")
    hr_sp = np.linalg.norm(hr_affine[:3, :3], axis=0)
    direction = hr_affine[:3, :3] / hr_sp
    affine = np.eye(4)
    affine[:3, :3] = direction * hr_sp * s
    affine[:3, 3] = hr_affine[:3, 3] + direction @ (hr_sp * (s - 1) / 2.0)
    return shape, affine


def to_lr_grid(hr_spacing_mm: Sequence[float], scale: int) -> tio.Transform:
    """For post-upsampling models: resample the LR ``image`` (trilinear) onto `lr_working_grid`,
    and, when there is a ``target``, cut it to ``scale x`` that shape and pack each
    ``scale^3`` HR block into channels (MONAI ``pixelunshuffle``): ``(s^3, X/s, Y/s, Z/s)``.

    Packing keeps the HR target on the LR grid, so TorchIO's samplers draw LR patches and their
    exact HR counterparts together; `ScaleBatch` unpacks them (MONAI ``pixelshuffle``).
    """
    from monai.networks.utils import pixelunshuffle

    s = int(scale)

    class _ToLRGrid(tio.SpatialTransform):
        def apply_transform(self, subject: tio.Subject) -> tio.Subject:
            lr = subject["image"]
            shape, affine = lr_working_grid(lr, hr_spacing_mm, s)
            if "target" in subject:
                hr = subject["target"]
                hr_shape, _ = hr_grid_for(lr, hr_spacing_mm)
                if tuple(hr.spatial_shape) != tuple(hr_shape):
                    raise ValueError(
                        f"target {tuple(hr.spatial_shape)} is not the HR grid {hr_shape} of the LR field"
                    )
                cut = hr.data[:, : shape[0] * s, : shape[1] * s, : shape[2] * s]
                packed = pixelunshuffle(cut[None].float(), 3, s)[0]
                subject.remove_image("target")
                subject.add_image(tio.ScalarImage(tensor=packed, affine=affine), "target")
            resampled = tio.Resample(
                (shape, affine), image_interpolation="linear", include=["image"]
            )
            return resampled(subject)

    return _ToLRGrid()


def pair_transform(
    meta: dict, *, pre_upsample: bool = True, with_target: bool = True, scale: int | None = None
):
    """Deterministic preprocessing for training, validation and inference alike.

    ``scale`` (post-upsampling models): the LR on `lr_working_grid`, the target packed
    (`to_lr_grid`); otherwise, with ``pre_upsample``, the LR on the HR grid (`to_hr_grid`).
    """
    ts: list = []
    if scale:
        ts.append(to_lr_grid(meta["hr_spacing_mm"], scale))
    elif pre_upsample:
        ts.append(to_hr_grid(meta["hr_spacing_mm"]))
    ts.append(intensity_transform(meta["lr_range"], meta["hr_range"] if with_target else None))
    return tio.Compose(ts)


def augmentation() -> tio.Compose:
    """Paired flips (identical for LR and HR: TorchIO applies one draw to the whole subject)."""
    return tio.Compose([tio.RandomFlip(axes=(0, 1, 2), flip_probability=0.5)])


def patch_loader(
    datalist: str,
    *,
    patch_size: Sequence[int],
    samples_per_volume: int = 8,
    queue_length: int = 64,
    batch_size: int = 2,
    pre_upsample: bool = True,
    augment: bool = True,
    seed: int = 0,
    distributed: bool = False,
    scale: int | None = None,
) -> DataLoader:
    """DataLoader over a TorchIO ``Queue`` of paired (LR, HR) training patches.

    With ``distributed`` (an initialised ``torch.distributed`` process group), each rank's queue
    draws its subjects through a ``DistributedSampler``, so ranks train on different specimens'
    patches; call ``loader.dataset.subject_sampler.set_epoch(epoch)`` every epoch (the bundles'
    EpochSeed handler in bundles/common/train_base.json does).
    """
    meta = datalist_meta(datalist)
    transform = pair_transform(meta, pre_upsample=pre_upsample, scale=scale)
    if augment and not scale:  # post-upsampling: flips on unpacked pairs, in ScaleBatch
        transform = tio.Compose([transform, augmentation()])
    if scale:  # patch_size is in HR voxels; the queue samples the LR grid
        if any(int(p) % int(scale) for p in patch_size):
            raise ValueError(f"patch_size {list(patch_size)} must be a multiple of scale {scale}")
        patch_size = [int(p) // int(scale) for p in patch_size]
    subjects = load_subjects(datalist, "training")
    one_sided = [s["specimen"] for s in subjects if not {"image", "target"} <= set(s.keys())]
    if one_sided:
        raise InputError(
            datalist,
            f"paired training needs image and target in every training entry; {one_sided} have "
            "one (unpaired data: use unpaired_loader, as the cyclegan/stargan/funit bundles do)",
        )
    dataset = tio.SubjectsDataset(subjects, transform=transform)
    queue = _queue(dataset, patch_size, queue_length, samples_per_volume, distributed, seed)
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(queue, batch_size=batch_size, num_workers=0, generator=generator)


def _queue(dataset, patch_size, queue_length, samples_per_volume, distributed, seed) -> tio.Queue:
    subject_sampler = None
    if distributed:
        from torch.utils.data.distributed import DistributedSampler

        subject_sampler = DistributedSampler(dataset, shuffle=True, seed=seed)
    return tio.Queue(
        dataset,
        max_length=queue_length,
        samples_per_volume=samples_per_volume,
        sampler=tio.UniformSampler(tuple(int(p) for p in patch_size)),
        num_workers=0,
        shuffle_subjects=subject_sampler is None,
        shuffle_patches=True,
        subject_sampler=subject_sampler,
    )


def to_spacing(spacing_mm: Sequence[float], name: str = "target") -> tio.Transform:
    """Resample image ``name`` to ``spacing_mm`` (linear, anti-aliased when coarser: TorchIO
    ``Resample(antialias=True)``), unless it is already on that spacing: an unpaired micro-CT
    scanned at another voxel size joins the HR domain on the model's grid."""
    import numpy as np

    class _ToSpacing(tio.SpatialTransform):
        def apply_transform(self, subject: tio.Subject) -> tio.Subject:
            if np.allclose(subject[name].spacing, spacing_mm, rtol=1e-3):
                return subject
            resample = tio.Resample(
                tuple(float(s) for s in spacing_mm), antialias=True, include=[name]
            )
            return resample(subject)

    return _ToSpacing()


class DomainPairs(torch.utils.data.Dataset):
    """Item ``i``: the next patch of an LR-domain queue as ``image`` and of an HR-domain queue
    as ``target``, drawn independently (other specimens, other places): unpaired batches.
    ``specimen`` names the LR patch's specimen, ``target_specimen`` the HR one's. ``queues``
    holds both (the bundles' `bone3d.engines.EpochSeed` resets each every epoch)."""

    def __init__(self, lr_queue: tio.Queue, hr_queue: tio.Queue):
        self.queues = (lr_queue, hr_queue)

    def __len__(self) -> int:
        return min(len(q) for q in self.queues)

    def __getitem__(self, index: int) -> dict:
        a, b = (q[index] for q in self.queues)
        return {"image": a["image"], "target": b["target"], "specimen": a["specimen"],
                "target_specimen": b["specimen"]}  # fmt: skip


def unpaired_loader(
    datalist: str,
    *,
    patch_size: Sequence[int],
    samples_per_volume: int = 8,
    queue_length: int = 64,
    batch_size: int = 2,
    augment: bool = True,
    seed: int = 0,
    distributed: bool = False,
    scale: int | None = None,
) -> DataLoader:
    """DataLoader of unpaired training batches for CycleGAN, StarGAN and FUNIT.

    The LR domain is every training entry with an ``image`` (a scan resampled onto the HR grid
    of its own field of view, as for paired training). The HR domain is every entry with a
    ``target``, resampled to the datalist's ``hr_spacing_mm`` when scanned at another
    (`to_spacing`). An entry may hold only one of them: a clinical scan of a patient without
    micro-CT, or a micro-CT without a matching scan. Each domain has its own TorchIO ``Queue``
    (uniform patches, independent flips), and `DomainPairs` zips them. Validation and test
    entries stay paired, so the runs are scored against HR as usual. Pre-upsampled models
    only (``scale`` must be None).
    """
    if scale:
        raise ValueError("unpaired training is for pre-upsampled generators (scale None)")
    meta = datalist_meta(datalist)
    subjects = load_subjects(datalist, "training")
    lr = [tio.Subject(image=s["image"], specimen=s["specimen"]) for s in subjects if "image" in s]
    hr = [
        tio.Subject(target=s["target"], specimen=s["specimen"]) for s in subjects if "target" in s
    ]
    if not lr or not hr:
        raise InputError(
            datalist, "unpaired training needs LR ('image') and HR ('target') training volumes"
        )
    lr_t = tio.Compose(
        [to_hr_grid(meta["hr_spacing_mm"]), intensity_transform(meta["lr_range"], None)]
    )
    hr_t = tio.Compose(
        [to_spacing(meta["hr_spacing_mm"], "target"),
         intensity_transform(meta["lr_range"], meta["hr_range"])]
    )  # fmt: skip
    if augment:
        lr_t, hr_t = tio.Compose([lr_t, augmentation()]), tio.Compose([hr_t, augmentation()])
    queues = [
        _queue(
            tio.SubjectsDataset(subs, transform=t),
            patch_size,
            queue_length,
            samples_per_volume,
            distributed,
            seed + i,
        )
        for i, (subs, t) in enumerate(((lr, lr_t), (hr, hr_t)))
    ]
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(
        DomainPairs(*queues), batch_size=batch_size, num_workers=0, generator=generator
    )


def volume_loader(
    datalist: str,
    split: str = "validation",
    *,
    pre_upsample: bool = True,
    distributed: bool = False,
    scale: int | None = None,
):
    """DataLoader of whole preprocessed volumes (batch size 1) for validation.

    With ``distributed``, volumes are shared out over the ranks (MONAI's ``DistributedSampler``;
    with fewer volumes than ranks some are evaluated twice, which leaves means unchanged only
    when every volume is repeated equally: keep validation sets >= the number of ranks).
    MONAI metrics then gather their results over all ranks.
    """
    meta = datalist_meta(datalist)
    dataset = tio.SubjectsDataset(
        load_subjects(datalist, split),
        transform=pair_transform(meta, pre_upsample=pre_upsample, scale=scale),
    )
    sampler = None
    if distributed:
        from monai.data import DistributedSampler

        sampler = DistributedSampler(dataset, shuffle=False, even_divisible=True)
    return DataLoader(dataset, batch_size=1, num_workers=0, sampler=sampler)


def prepare_batch(batchdata, device=None, non_blocking: bool = False, **kwargs):
    """MONAI ``prepare_batch`` for TorchIO batches: returns ``(LR image, HR target)`` tensors.

    ``batchdata["image"]["data"]`` is ``(B, 1, X, Y, Z)``; the target may be absent (inference).
    """
    image = batchdata["image"][tio.DATA].to(device=device, non_blocking=non_blocking)
    target = batchdata.get("target")
    if target is not None:
        target = target[tio.DATA].to(device=device, non_blocking=non_blocking)
    return image.float(), None if target is None else target.float()


class SlabBatch:
    """``prepare_batch`` for 2D / 2.5D training on 3D TorchIO patches of depth 2k+1.

    The patch ``(B, 1, X, Y, 2k+1)`` becomes the 2D input ``(B, 2k+1, X, Y)`` (neighbouring
    slices as channels) and the target its centre slice ``(B, 1, X, Y)``; ``k = 0`` is plain 2D.
    """

    def __init__(self, slab: int):
        if slab < 0:
            raise ValueError("slab half-width must be >= 0")
        self.slab = int(slab)

    def __call__(self, batchdata, device=None, non_blocking: bool = False, **kwargs):
        image, target = prepare_batch(batchdata, device, non_blocking)
        depth = image.shape[-1]
        if depth != 2 * self.slab + 1:
            raise ValueError(f"patch depth {depth} != 2 * slab + 1 = {2 * self.slab + 1}")
        x = image[:, 0].permute(0, 3, 1, 2)  # (B, 2k+1, X, Y)
        y = None if target is None else target[:, :, :, :, self.slab]
        return x, y


class ScaleBatch:
    """``prepare_batch`` for post-upsampling models.

    3D (``slab=None``): the LR patch ``(B, 1, x, y, z)`` as is, the packed target
    ``(B, s^3, x, y, z)`` unpacked to ``(B, 1, s x, s y, s z)`` (MONAI ``pixelshuffle``).
    2D / 2.5D (``slab=k``, LR patch depth ``2k+1``): the input is the slab as channels
    ``(B, 2k+1, x, y)`` and the target the ``s`` HR slices of the centre LR slice as channels
    ``(B, s, s x, s y)`` (the 2D network up-samples in-plane and predicts ``s`` slices).
    With ``augment``, random flips along each axis, the same for LR and HR (torch's generator,
    which the bundles reseed every epoch).
    """

    def __init__(self, scale: int, augment: bool = False, slab: int | None = None):
        self.scale = int(scale)
        self.augment = bool(augment)
        self.slab = None if slab is None else int(slab)

    def __call__(self, batchdata, device=None, non_blocking: bool = False, **kwargs):
        from monai.networks.utils import pixelshuffle

        s = self.scale
        image, target = prepare_batch(batchdata, device, non_blocking)
        if target is not None and target.shape[1] == s**3 and s > 1:
            target = pixelshuffle(target, 3, s)
        if self.augment:
            dims = [d + 2 for d in range(3) if bool(torch.rand(()) < 0.5)]
            if dims:
                image = torch.flip(image, dims)
                target = None if target is None else torch.flip(target, dims)
        if self.slab is None:
            return image, target
        k = self.slab
        if image.shape[-1] != 2 * k + 1:
            raise ValueError(f"LR patch depth {image.shape[-1]} != 2 * slab + 1 = {2 * k + 1}")
        x = image[:, 0].permute(0, 3, 1, 2)  # (B, 2k+1, x, y)
        if target is None:
            return x, None
        y = target[:, 0, :, :, k * s : (k + 1) * s].permute(0, 3, 1, 2)  # (B, s, sx, sy)
        return x, y
