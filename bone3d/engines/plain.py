"""Training parts that need only MONAI and torch: checkpoint handling and per-epoch seeding
shared with bone3d's own bundles, and the paired-patch transforms of an exported bundle's
fine-tuning config.

``bone3d export`` copies this file into the exported bundle's ``scripts/`` (it must not import
bone3d): the exported ``configs/train.json`` fine-tunes the network in a plain MONAI install on
the user's registered LR/HR pairs. bone3d's own training reads pairs through TorchIO
(`bone3d.data.patches`); the transforms here are its MONAI dictionary-transform counterparts,
tested to give the same input grids (tests/test_export.py). MONAI has no transform that puts an
LR image on a grid ``scale`` times coarser than its HR target's, corner to corner, nor one that
turns a 3D slab into 2D channels, hence hand-written (a few lines each, on MONAI's resampler
and ``pixelshuffle``).

Shapes: a sample's ``image`` is ``(1, X, Y, Z)`` (LR) and ``target`` ``(1, sX, sY, sZ)`` (HR),
``s`` the model's up-sampling factor (1 for pre-upsampling models); intensities are the
network's [0, 1] units.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np
import torch
from monai.networks.utils import pixelshuffle, pixelunshuffle
from monai.transforms import MapTransform, SpatialResample


def latest_checkpoint(ckpt_dir: str | os.PathLike) -> str | None:
    """The newest ``checkpoint_epoch=N.pt`` (model, optimiser, scheduler, trainer) in
    ``ckpt_dir``, or None. Written by the bundles' ``CheckpointSaver`` every epoch."""
    best, best_epoch = None, -1
    folder = Path(ckpt_dir)
    if not folder.is_dir():
        return None
    for f in folder.glob("checkpoint_epoch=*.pt"):
        m = re.search(r"epoch=(\d+)\.pt$", f.name)
        if m and int(m.group(1)) > best_epoch:
            best, best_epoch = str(f), int(m.group(1))
    return best


def resume_checkpoint(ckpt_dir: str | os.PathLike, resume) -> str | None:
    """The exported fine-tuning's start: with ``resume`` (True or the word ``true``, as MONAI's
    command line passes it) the newest checkpoint in ``ckpt_dir`` (None when there is none);
    without, None, refusing a ``ckpt_dir`` that already holds checkpoints (a later resumed run
    would otherwise pick the earlier run's newest epoch)."""
    last = latest_checkpoint(ckpt_dir)
    if str(resume).strip().lower() in ("true", "1", "yes"):
        return last
    if last is not None:
        raise FileExistsError(
            f"{ckpt_dir} holds checkpoints of an earlier run ({Path(last).name}); move it away or "
            "pass another --output_dir to start again, or drop --resume false to continue it"
        )
    return None


class EpochSeed:
    """Make every training epoch a function of (seed, epoch, rank) alone, so a resumed training
    ends with the same weights as an uninterrupted one.

    At each ``EPOCH_STARTED``: MONAI's ``set_determinism`` with a seed derived from
    ``(seed, epoch, rank)`` (NumPy ``SeedSequence``), the TorchIO ``Queue`` emptied (its patch
    list, half-sampled subject and subject iterator otherwise carry over from the previous epoch,
    state no checkpoint holds), and the subject sampler's ``set_epoch`` called when it has one
    (``DistributedSampler``). Checkpoints then need no RNG or queue state: resuming at epoch
    ``k + 1`` replays exactly what the uninterrupted run did. The queue attributes reset are
    TorchIO 1.2's own (``Queue._fill`` re-creates them), pinned in requirements.txt.

    A MONAI ``Dataset`` (an exported bundle's fine-tuning) instead has its random transforms
    re-seeded from the epoch's seed by MONAI's ``set_rnd``, as ``monai.data.DataLoader`` does
    once at construction when it has no workers; the loader's shuffle and its workers' seeds
    come from torch's generator, which ``set_determinism`` sets.
    """

    def __init__(self, seed: int, loader):
        self.seed = int(seed)
        self.loader = loader

    def attach(self, engine) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.EPOCH_STARTED, self)

    def __call__(self, engine) -> None:
        import torch.distributed as dist
        from monai.data import Dataset
        from monai.data.utils import set_rnd
        from monai.utils import set_determinism

        epoch = int(engine.state.epoch)
        rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        seed = int(np.random.SeedSequence([self.seed, epoch, rank]).generate_state(1)[0])
        set_determinism(seed=seed)
        dataset = getattr(self.loader, "dataset", None)
        if isinstance(dataset, Dataset):
            set_rnd(dataset, seed)
        for queue in getattr(dataset, "queues", (dataset,)):  # unpaired: one queue per domain
            self._reset(queue, epoch)

    @staticmethod
    def _reset(queue, epoch: int) -> None:
        if queue is not None and hasattr(queue, "patches_list"):
            queue.patches_list = []
            queue._incomplete_subject = None
            queue._num_patches_incomplete = 0
            queue._subjects_iterable = None
            queue._num_sampled_subjects = 0
            sampler = getattr(queue, "subject_sampler", None)
            if sampler is not None and hasattr(sampler, "set_epoch"):
                sampler.set_epoch(epoch)


def atomic_checkpoint_saver(resume_from: str | None = None, **kwargs):
    """MONAI ``CheckpointSaver`` whose files are written atomically (temp file + rename), and
    whose best-model tracking survives a resume.

    MONAI builds ignite ``DiskSaver``s with ``atomic=False`` (for group-readable files), so a
    training killed while saving leaves a truncated ``checkpoint_epoch=N.pt`` that the next run
    would try to resume from. Switching the savers back to ignite's atomic mode keeps the last
    complete checkpoint in place until the new one is whole.

    With ``save_key_metric`` (the best model by the validation key metric, ``model.pt``) the
    saver keeps the best score so far in memory only, so a resumed run would overwrite the
    best model with its first validation, however worse. Here the tracker's state (ignite
    ``Checkpoint.state_dict``: the best score and file), with the evaluator's ``best_metric``
    and ``best_metric_epoch`` (MONAI ``Workflow`` state, which its "new best metric" log and
    ``get_stats`` report), is written beside it after every validation (``<key_metric_filename
    stem>.key_metric.json``, atomically), and read back when ``resume_from`` (the checkpoint a
    run resumes from; None for a fresh run) is given. MONAI's own way,
    ``key_metric_save_state``, stores that state inside ``model.pt``, which would change the
    weights file every reader of a bundle loads. A resumed run whose ``model.pt`` has no record
    (written by an older bone3d) cannot know that file's score: it is copied to
    ``<stem>.before_resume.pt`` first (once, atomically), with a warning, so nothing is lost.
    """
    import shutil
    import warnings

    from monai.handlers import CheckpointSaver

    saver = CheckpointSaver(**kwargs)
    for name in ("_final_checkpoint", "_key_metric_checkpoint", "_interval_checkpoint"):
        cp = getattr(saver, name, None)
        if cp is not None and hasattr(cp.save_handler, "_atomic"):
            cp.save_handler._atomic = True  # ignite DiskSaver's own switch
    best = getattr(saver, "_key_metric_checkpoint", None)
    if best is None:
        return saver
    filename = Path(kwargs.get("key_metric_filename") or "model.pt")
    record = Path(saver.save_dir) / f"{filename.stem}.key_metric.json"
    previous = None
    if resume_from is not None and record.is_file():
        previous = json.loads(record.read_text())
        best.load_state_dict({"_saved": previous["_saved"]})
    elif resume_from is not None and (Path(saver.save_dir) / filename.name).is_file():
        kept = Path(saver.save_dir) / f"{filename.stem}.before_resume{filename.suffix}"
        if not kept.exists():
            tmp = kept.with_name(kept.name + ".tmp")
            shutil.copyfile(Path(saver.save_dir) / filename.name, tmp)
            os.replace(tmp, kept)
        warnings.warn(
            f"{saver.save_dir}/{filename.name} has no {record.name} (written before bone3d "
            f"recorded the best score), so the first validation after this resume replaces it; "
            f"the earlier best weights are kept as {kept.name}",
            stacklevel=2,
        )
    attach, validated = saver.attach, saver.metrics_completed  # what `attach` registers

    def attach_restoring(engine) -> None:
        attach(engine)
        if previous is not None and previous.get("best_metric_epoch", -1) != -1:
            engine.state.best_metric = previous["best_metric"]
            engine.state.best_metric_epoch = previous["best_metric_epoch"]

    def metrics_completed(engine) -> None:
        validated(engine)
        state = {"_saved": [[float(p), str(f)] for p, f in best.state_dict()["_saved"]]}
        if getattr(engine.state, "best_metric_epoch", -1) != -1:  # a MONAI Workflow
            state["best_metric"] = float(engine.state.best_metric)
            state["best_metric_epoch"] = int(engine.state.best_metric_epoch)
        tmp = record.with_name(record.name + ".tmp")
        tmp.write_text(json.dumps(state))
        os.replace(tmp, record)

    saver.attach, saver.metrics_completed = attach_restoring, metrics_completed
    return saver


def datalist_pairs(datalist: str | os.PathLike, split: str, required: bool = True) -> list[dict]:
    """The ``{"image": LR, "target": HR}`` entries of one split of a MONAI decathlon-style
    datalist (bone3d's ``datalist.json``; relative paths are taken from its folder, MONAI's
    ``load_decathlon_datalist``). Refuses a missing or empty split when ``required``, an entry
    without both files, and a file that does not exist."""
    from monai.data import load_decathlon_datalist

    path = Path(datalist)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such datalist")
    if split not in json.loads(path.read_text()):
        if required:
            raise ValueError(f"{path}: no {split!r} list")
        return []
    items = load_decathlon_datalist(str(path), is_segmentation=False, data_list_key=split)
    if required and not items:
        raise ValueError(f"{path}: the {split!r} list is empty")
    for i, item in enumerate(items):
        for key in ("image", "target"):
            if not item.get(key):
                raise ValueError(f"{path}: {split} entry {i} has no {key!r} (LR image, HR target)")
            if not Path(item[key]).is_file():
                raise FileNotFoundError(f"{path}: {split} entry {i}: {item[key]} does not exist")
    return [{"image": it["image"], "target": it["target"]} for it in items]


def _spacing(affine) -> np.ndarray:
    return np.linalg.norm(np.asarray(affine, dtype=np.float64)[:3, :3], axis=0)


class PairGridd(MapTransform):
    """Put the LR ``image`` on the grid the network reads, derived from the HR ``target``'s.

    The grid is the target's coarsened ``scale`` times, corner to corner (``scale`` 1: the
    target's own grid, for pre-upsampling models), ``floor(target shape / scale)`` voxels; the
    LR is resampled onto it (trilinear, edges replicated) and the target cut to ``scale`` times
    that shape. With ``pack`` the target's ``scale^3`` blocks go into channels (MONAI
    ``pixelunshuffle``): ``(s^3, X, Y, Z)`` on the LR grid, so that one random crop cuts an LR
    patch and its exact HR counterpart (`Unpackd` undoes it). This is bone3d's
    `bone3d.data.patches.lr_working_grid` when the target is the HR grid of the LR field.

    Refuses, naming the file, a pair whose target spacing is not the network's HR spacing
    ``hr_spacing_mm``, whose LR does not cover the target's field (within half an LR voxel),
    or whose values are not all finite.
    """

    def __init__(self, hr_spacing_mm, scale: int = 1, pack: bool = False, keys=("image", "target")):
        super().__init__(list(keys))
        self.hr_spacing = np.asarray(hr_spacing_mm, dtype=np.float64)
        self.scale = int(scale or 1)
        self.pack = bool(pack)
        self.resample = SpatialResample(mode="bilinear", padding_mode="border")

    @staticmethod
    def _name(img) -> str:
        meta = getattr(img, "meta", {}) or {}
        return str(meta.get("filename_or_obj", "<array>"))

    def __call__(self, data):
        d = dict(data)
        lr_key, hr_key = self.keys
        lr, hr = d[lr_key], d[hr_key]
        for img in (lr, hr):
            if img.ndim != 4:
                raise ValueError(
                    f"{self._name(img)}: expected (C, X, Y, Z), got {tuple(img.shape)}"
                )
            if not torch.isfinite(torch.as_tensor(img)).all():
                raise ValueError(f"{self._name(img)}: has NaN or infinite values")
        s = self.scale
        hr_affine = np.asarray(hr.affine, dtype=np.float64)
        hr_sp = _spacing(hr_affine)
        if not np.allclose(hr_sp, self.hr_spacing, rtol=0.01):
            raise ValueError(
                f"{self._name(hr)}: spacing {hr_sp.round(5).tolist()} mm is not the network's HR "
                f"spacing {self.hr_spacing.tolist()} mm; resample the target first"
            )
        shape = [int(n) // s for n in hr.shape[1:]]
        if min(shape) < 1:
            raise ValueError(f"{self._name(hr)}: smaller than the up-sampling factor {s}")
        direction = hr_affine[:3, :3] / hr_sp
        affine = np.eye(4)
        affine[:3, :3] = direction * hr_sp * s
        affine[:3, 3] = hr_affine[:3, 3] + direction @ (hr_sp * (s - 1) / 2.0)
        # the LR field (voxel edges) must hold the target's (voxel edges), half an LR voxel spare
        lr_affine = np.asarray(lr.affine, dtype=np.float64)
        lr_sp = _spacing(lr_affine)
        corners = np.array(
            [[a, b, c, 1.0] for a in (-0.5, shape[0] * s - 0.5) for b in (-0.5, shape[1] * s - 0.5)
             for c in (-0.5, shape[2] * s - 0.5)]
        )  # fmt: skip
        in_lr = (np.linalg.inv(lr_affine) @ (hr_affine @ corners.T)).T[:, :3]
        lo, hi = -1.0, np.asarray(lr.shape[1:], dtype=np.float64)
        if (in_lr < lo - 1e-3).any() or (in_lr > hi + 1e-3).any():
            raise ValueError(
                f"{self._name(hr)} reaches outside the field of view of {self._name(lr)} "
                f"(LR voxel extent {lr_sp.round(5).tolist()} mm x {list(lr.shape[1:])}); "
                "register the pair first (bone3d register)"
            )
        d[lr_key] = self.resample(
            lr, dst_affine=torch.as_tensor(affine), spatial_size=shape, dtype=torch.float32
        )
        cut = hr[:, : shape[0] * s, : shape[1] * s, : shape[2] * s]
        if self.pack and s > 1:
            cut = pixelunshuffle(torch.as_tensor(cut)[None].float(), 3, s)[0]
        d[hr_key] = cut
        return d


class Unpackd(MapTransform):
    """Undo `PairGridd`'s packing of the target after cropping: ``(s^3, x, y, z)`` ->
    ``(1, s x, s y, s z)`` (MONAI ``pixelshuffle``)."""

    def __init__(self, scale: int, keys=("target",)):
        super().__init__(list(keys))
        self.scale = int(scale or 1)

    def __call__(self, data):
        d = dict(data)
        for k in self.keys:
            if self.scale > 1:
                d[k] = pixelshuffle(torch.as_tensor(d[k])[None], 3, self.scale)[0]
        return d


class SlabChannelsd(MapTransform):
    """2D and 2.5D models: an LR patch ``(1, x, y, 2k+1)`` becomes the input ``(2k+1, x, y)``
    (neighbouring slices as channels) and its target ``(1, s x, s y, s (2k+1))`` the ``s`` HR
    slices of the centre LR slice as channels, ``(s, s x, s y)``; bone3d's ``SlabBatch`` and
    ``ScaleBatch`` do the same on batches."""

    def __init__(self, slab: int, scale: int = 1, keys=("image", "target")):
        super().__init__(list(keys))
        self.slab = int(slab)
        self.scale = int(scale or 1)

    def __call__(self, data):
        d = dict(data)
        lr_key, hr_key = self.keys
        k, s = self.slab, self.scale
        x = torch.as_tensor(d[lr_key])
        if x.shape[-1] != 2 * k + 1:
            raise ValueError(f"patch depth {x.shape[-1]} != 2 * slab + 1 = {2 * k + 1}")
        d[lr_key] = x[0].permute(2, 0, 1).contiguous()
        d[hr_key] = torch.as_tensor(d[hr_key])[0, :, :, k * s : (k + 1) * s].permute(2, 0, 1)
        return d


def pair_batch(batchdata, device=None, non_blocking: bool = False, **kwargs):
    """MONAI ``prepare_batch``: the ``(image, target)`` tensors of a collated batch."""
    out = []
    for key in ("image", "target"):
        x = batchdata[key]
        x = x.as_tensor() if hasattr(x, "as_tensor") else torch.as_tensor(x)  # MetaTensor
        out.append(x.to(device=device, non_blocking=non_blocking).float())
    return tuple(out)
