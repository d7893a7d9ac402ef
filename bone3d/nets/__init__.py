"""The network zoo: one registry of names -> classes and presets.

Every network takes ``spatial_dims`` (2 or 3) first and builds its layers with MONAI's factories,
so one class is the 2D and the 3D model. 2.5D is the 2D network fed a slab of 2k+1 neighbouring
LR slices as channels (``in_channels=2k+1``), predicting the centre slice, or ``s_z`` HR slices
(``out_channels=s_z``) when the slice axis is up-sampled.

Kinds:
* ``generator``: image-to-image on the HR grid (the LR input is pre-upsampled);
* ``sr``: post-upsampling super-resolution, ``scale`` per axis (integers; resample non-integer
  ratios to an integer-ratio grid first);
* ``conditional``: generators with a second input (StarGAN domain labels, FUNIT class images,
  DAN kernel code);
* ``discriminator`` and ``estimator``.

Presets: ``paper`` (the published widths and depths: parameter counts equal the reference
implementations), ``cpu3d`` (capped widths/blocks so 64^3 patches train on 2 CPU cores), ``tiny``
(< 100 k parameters, for tests on 16^3-32^3 patches).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from bone3d.errors import InputError
from bone3d.nets import (
    crn,
    cyclegan,
    dan,
    edsr,
    fsrcnn,
    funit,
    pix2pix,
    pix2pixhd,
    r2rcan,
    rcan,
    rrdb,
    srcnn,
    stargan,
    unet,
    unet_d,
    vgg_d,
)


@dataclass(frozen=True)
class Entry:
    cls: type
    presets: dict
    kind: str
    source: str
    min_size: int = 16  # smallest spatial size (per axis) the ``tiny`` preset accepts
    extra: dict = field(default_factory=dict)


REGISTRY: dict[str, Entry] = {
    "unet": Entry(
        unet.UNetSR, unet.PRESETS, "generator", "Ronneberger et al. 2015 (murine micro-CT SR study)"
    ),
    "pix2pix_g": Entry(
        pix2pix.UnetGenerator, pix2pix.PRESETS_G, "generator", "Isola et al. 2017, U-Net G", 32
    ),
    "patchgan_d": Entry(
        pix2pix.NLayerDiscriminator,
        pix2pix.PRESETS_D,
        "discriminator",
        "Isola et al. 2017, 70x70 PatchGAN",
    ),
    "pix2pixhd_global": Entry(
        pix2pixhd.GlobalGenerator,
        pix2pixhd.PRESETS_GLOBAL,
        "generator",
        "Wang et al. 2018, pix2pixHD G1",
    ),
    "pix2pixhd_local": Entry(
        pix2pixhd.LocalEnhancer,
        pix2pixhd.PRESETS_LOCAL,
        "generator",
        "Wang et al. 2018, pix2pixHD G1+G2",
    ),
    "pix2pixhd_msd": Entry(
        pix2pixhd.MultiscaleDiscriminator,
        pix2pixhd.PRESETS_MSD,
        "discriminator",
        "Wang et al. 2018, multiscale D",
    ),
    "crn": Entry(crn.CRN, crn.PRESETS, "generator", "Chen & Koltun 2017, cascaded refinement"),
    "cyclegan_g": Entry(
        cyclegan.ResnetGenerator, cyclegan.PRESETS, "generator", "Zhu et al. 2017, ResNet G"
    ),
    "nlayer_d": Entry(
        pix2pix.NLayerDiscriminator,
        cyclegan.PRESETS_D,
        "discriminator",
        "Zhu et al. 2017, N-layer D",
    ),
    "stargan_g": Entry(
        stargan.StarGANGenerator, stargan.PRESETS_G, "conditional", "Choi et al. 2018, StarGAN G"
    ),
    "stargan_d": Entry(
        stargan.StarGANDiscriminator,
        stargan.PRESETS_D,
        "discriminator",
        "Choi et al. 2018, StarGAN D",
    ),
    "stargan": Entry(
        stargan.StarGANTranslator,
        stargan.PRESETS_T,
        "generator",
        "Choi et al. 2018, StarGAN G fixed to the micro-CT domain",
    ),
    "funit": Entry(
        funit.FUNITTranslator,
        funit.PRESETS_T,
        "generator",
        "Liu et al. 2019, FUNIT G with the mean micro-CT class code",
    ),
    "funit_g": Entry(
        funit.FUNITGenerator, funit.PRESETS_G, "conditional", "Liu et al. 2019, FUNIT G"
    ),
    "funit_d": Entry(
        funit.FUNITDiscriminator, funit.PRESETS_D, "discriminator", "Liu et al. 2019, FUNIT D"
    ),
    "srcnn": Entry(
        srcnn.SRCNN, srcnn.PRESETS, "generator", "Dong et al. 2014, SRCNN 9-5-5 (pre-upsampled)"
    ),
    "fsrcnn": Entry(fsrcnn.FSRCNN, fsrcnn.PRESETS, "sr", "Dong et al. 2016, FSRCNN(56,12,4)", 8),
    "edsr": Entry(edsr.EDSR, edsr.PRESETS, "sr", "Lim et al. 2017, EDSR", 8),
    "rcan": Entry(rcan.RCAN, rcan.PRESETS, "sr", "Zhang et al. 2018, RCAN", 8),
    "rrdb": Entry(rrdb.RRDBNet, rrdb.PRESETS, "sr", "Wang et al. 2018, ESRGAN RRDBNet", 8),
    "r2rcan": Entry(
        r2rcan.R2RCAN, r2rcan.PRESETS, "sr", "R2-RCANGAN generator (rat tibia x8 study)", 8
    ),
    "unet_d_sn": Entry(
        unet_d.UNetDiscriminatorSN,
        unet_d.PRESETS,
        "discriminator",
        "Wang et al. 2021, Real-ESRGAN U-Net D",
    ),
    "vgg_d": Entry(
        vgg_d.VGGDiscriminator,
        vgg_d.PRESETS,
        "discriminator",
        "Wang et al. 2018, ESRGAN VGG-128 D",
        32,
    ),
    "dan": Entry(dan.DANSR, dan.PRESETS, "sr", "Luo et al. 2020, DAN (restorer + estimator)", 8),
    "dan_restorer": Entry(
        dan.DANRestorer, dan.PRESETS_R, "conditional", "Luo et al. 2020, DAN restorer", 8
    ),
    "dan_estimator": Entry(
        dan.DANEstimator, dan.PRESETS_E, "estimator", "Luo et al. 2020, DAN estimator", 8
    ),
}

SR_KINDS = ("sr",)
TAKES_SCALE = {"fsrcnn", "edsr", "rcan", "rrdb", "r2rcan", "dan", "dan_restorer", "dan_estimator"}
NO_OUT_CHANNELS = {name for name, e in REGISTRY.items() if e.kind in ("discriminator", "estimator")}


def build_spec(
    name: str,
    spatial_dims: int = 3,
    preset: str = "cpu3d",
    in_channels: int = 1,
    out_channels: int = 1,
    scale=None,
    inference: bool = False,
    **kwargs,
) -> tuple[type, dict]:
    """The class and constructor arguments `build` uses (``bone3d export`` writes them into a
    bundle config that needs no bone3d).

    ``inference``: the class's inference-only form, its ``EXPORT_ARGS`` (FUNIT's averaged
    generator without the trained one), which loads a training checkpoint or an exported one
    alike."""
    if name not in REGISTRY:
        raise InputError("network", f"unknown network {name!r}; choose from {sorted(REGISTRY)}")
    entry = REGISTRY[name]
    if preset not in entry.presets:
        raise InputError(
            "preset", f"{name} has no preset {preset!r}; choose from {sorted(entry.presets)}"
        )
    if spatial_dims not in (2, 3):
        raise InputError("spatial_dims", f"must be 2 or 3, got {spatial_dims}")
    args = {**entry.presets[preset], **kwargs}
    args["spatial_dims"] = spatial_dims
    args["in_channels"] = in_channels
    if name not in NO_OUT_CHANNELS:
        args["out_channels"] = out_channels
    if name in TAKES_SCALE:
        args["scale"] = scale if scale is not None else 2
    if inference:
        args.update(getattr(entry.cls, "EXPORT_ARGS", {}))
    return entry.cls, args


def build(name: str, *args, **kwargs) -> nn.Module:
    """Build registry network ``name``; the arguments are `build_spec`'s (``spatial_dims``,
    ``preset``, ``in_channels``, ``out_channels``, ``scale``; other keywords override the preset).

    ``scale`` (per-axis integers) is used by the post-upsampling models and the DAN parts.
    """
    cls, spec = build_spec(name, *args, **kwargs)
    try:
        return cls(**spec)
    except (TypeError, ValueError) as err:
        raise InputError(name, str(err)) from None


def load_weights(net: nn.Module, path, map_location="cpu") -> dict:
    """Load the state dict saved at ``path`` into ``net`` (strictly, by the network's own
    ``load_state_dict``: an inference-only form such as FUNIT's sets aside the entries it does
    not hold) and return the network's state. A MONAI ``CheckpointSaver`` file with a
    ``model`` entry is unwrapped; a file that does not fit is an `InputError`."""
    import torch

    saved = torch.load(path, map_location=map_location, weights_only=True)
    if isinstance(saved, dict) and isinstance(saved.get("model"), dict):
        saved = saved["model"]  # a MONAI CheckpointSaver's training checkpoint
    try:
        net.load_state_dict(saved)
    except RuntimeError as err:
        detail = " ".join(str(err).split())[:300]
        raise InputError(
            path,
            f"does not fit the network ({detail}); was it trained with another net_preset or "
            "variant?",
        ) from None
    return net.state_dict()


def n_parameters(model: nn.Module) -> int:
    """Trainable parameters (a frozen moving-average copy, FUNIT's ``generator_test``, is not
    counted)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
