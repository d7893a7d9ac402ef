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
from bone3d.io import read_volume


def load_subjects(datalist: str, split: str) -> list[tio.Subject]:
    """Read every volume of one split of a datalist (validated by `bone3d.io.read_volume`)."""
    subjects = []
    for item in datalist_items(datalist, split):
        images = {"image": read_volume(item["image"])}
        if item.get("target"):
            images["target"] = read_volume(item["target"])
        subjects.append(tio.Subject(**images, specimen=item["specimen"]))
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


def pair_transform(meta: dict, *, pre_upsample: bool = True, with_target: bool = True):
    """Deterministic preprocessing for training, validation and inference alike."""
    ts: list = []
    if pre_upsample:
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
) -> DataLoader:
    """DataLoader over a TorchIO ``Queue`` of paired (LR, HR) training patches.

    With ``distributed`` (an initialised ``torch.distributed`` process group), each rank's queue
    draws its subjects through a ``DistributedSampler``, so ranks train on different specimens'
    patches; call ``loader.dataset.subject_sampler.set_epoch(epoch)`` every epoch (the bundle's
    multi-GPU config does).
    """
    meta = datalist_meta(datalist)
    transform = pair_transform(meta, pre_upsample=pre_upsample)
    if augment:
        transform = tio.Compose([transform, augmentation()])
    dataset = tio.SubjectsDataset(load_subjects(datalist, "training"), transform=transform)
    subject_sampler = None
    if distributed:
        from torch.utils.data.distributed import DistributedSampler

        subject_sampler = DistributedSampler(dataset, shuffle=True, seed=seed)
    queue = tio.Queue(
        dataset,
        max_length=queue_length,
        samples_per_volume=samples_per_volume,
        sampler=tio.UniformSampler(tuple(int(p) for p in patch_size)),
        num_workers=0,
        shuffle_subjects=subject_sampler is None,
        shuffle_patches=True,
        subject_sampler=subject_sampler,
    )
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(queue, batch_size=batch_size, num_workers=0, generator=generator)


def volume_loader(
    datalist: str,
    split: str = "validation",
    *,
    pre_upsample: bool = True,
    distributed: bool = False,
):
    """DataLoader of whole preprocessed volumes (batch size 1) for validation.

    With ``distributed``, volumes are shared out over the ranks (MONAI's ``DistributedSampler``;
    with fewer volumes than ranks some are evaluated twice, which leaves means unchanged only
    when every volume is repeated equally: keep validation sets >= the number of ranks).
    MONAI metrics then gather their results over all ranks.
    """
    meta = datalist_meta(datalist)
    dataset = tio.SubjectsDataset(
        load_subjects(datalist, split), transform=pair_transform(meta, pre_upsample=pre_upsample)
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
