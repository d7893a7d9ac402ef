"""The network zoo: published parameter counts, shapes in 2D / 2.5D / 3D, TorchScript."""

from __future__ import annotations

import pytest
import torch

from bone3d.nets import REGISTRY, TAKES_SCALE, build, n_parameters
from bone3d.nets.cyclegan import ResnetGenerator
from bone3d.nets.dan import DANEstimator, DANRestorer
from bone3d.nets.edsr import EDSR
from bone3d.nets.fsrcnn import FSRCNN
from bone3d.nets.funit import FUNITDiscriminator, FUNITGenerator
from bone3d.nets.pix2pix import NLayerDiscriminator, UnetGenerator
from bone3d.nets.pix2pixhd import GlobalGenerator, LocalEnhancer, MultiscaleDiscriminator
from bone3d.nets.rcan import RCAN
from bone3d.nets.rrdb import RRDBNet
from bone3d.nets.srcnn import SRCNN
from bone3d.nets.stargan import StarGANDiscriminator, StarGANGenerator
from bone3d.nets.unet_d import UNetDiscriminatorSN
from bone3d.nets.vgg_d import VGGDiscriminator

# (factory, count measured from the reference implementations at their default configurations)
PAPER_COUNTS = {
    "pix2pixHD global G (36->3)": (lambda: GlobalGenerator(2, 36, 3), 182_546_755),
    "pix2pixHD local enhancer (36->3)": (lambda: LocalEnhancer(2, 36, 3), 182_857_059),
    "pix2pixHD multiscale D (39 in)": (lambda: MultiscaleDiscriminator(2, 39), 8_404_803),
    "pix2pix U-Net-256": (lambda: UnetGenerator(2, 3, 3), 54_413_955),
    "PatchGAN (6 in, batch)": (lambda: NLayerDiscriminator(2, 6), 2_768_705),
    "CycleGAN ResNet-9": (lambda: ResnetGenerator(2, 3, 3), 11_378_179),
    "N-layer D (instance)": (lambda: NLayerDiscriminator(2, 3, norm_kind="instance"), 2_764_737),
    "StarGAN G": (lambda: StarGANGenerator(2, 3, 3), 8_430_528),
    "StarGAN D": (lambda: StarGANDiscriminator(2, 3), 44_762_048),
    "SRCNN 9-5-5": (lambda: SRCNN(2, 1, 1), 57_281),
    "FSRCNN(56,12,4)": (lambda: FSRCNN(2, 1, 1, scale=2), 12_809),
    "EDSR-baseline x2": (lambda: EDSR(2, 3, 3, 2, 16, 64), 1_369_859),
    "EDSR-baseline x4": (lambda: EDSR(2, 3, 3, 4, 16, 64), 1_517_571),
    "EDSR 32x256 x4": (lambda: EDSR(2, 3, 3, 4, 32, 256), 43_089_923),
    "RCAN x2": (lambda: RCAN(2, 3, 3, 2), 15_444_643),
    "RCAN x4": (lambda: RCAN(2, 3, 3, 4), 15_592_355),
    "RCAN x8": (lambda: RCAN(2, 3, 3, 8), 15_740_067),
    "RRDBNet x4": (lambda: RRDBNet(2, 3, 3, 4), 16_697_987),
    "U-Net D SN": (lambda: UNetDiscriminatorSN(2, 3), 4_376_897),
    "VGG-128 D": (lambda: VGGDiscriminator(2, 3), 14_499_401),
    "DAN restorer x4": (lambda: DANRestorer(2, 3, 3, 4), 4_040_915),
    "DAN estimator x4": (lambda: DANEstimator(2, 3, 4), 288_596),
    "FUNIT G (animals)": (lambda: FUNITGenerator(2, 3, 3), 29_866_435),
    "FUNIT D (119 classes)": (lambda: FUNITDiscriminator(2, 3), 54_252_599),
}


@pytest.mark.parametrize("name", sorted(PAPER_COUNTS))
def test_paper_parameter_counts(name):
    factory, expected = PAPER_COUNTS[name]
    assert n_parameters(factory()) == expected


def test_registry_paper_presets_are_the_published_networks():
    assert n_parameters(build("pix2pix_g", 2, "paper", 3, 3)) == 54_413_955
    assert n_parameters(build("rcan", 2, "paper", 3, 3, scale=4)) == 15_592_355
    assert n_parameters(build("edsr", 2, "baseline", 3, 3, scale=2)) == 1_369_859


def _inputs(name: str, d: int, in_ch: int, size: int, batch: int = 2, preset: str = "tiny"):
    e = REGISTRY[name]
    x = torch.rand(batch, in_ch, *([size] * d))
    if name == "stargan_g":
        c = torch.zeros(batch, e.presets[preset]["c_dim"])
        c[:, 0] = 1
        return (x, c)
    if name == "funit_g":
        return (x, torch.rand(batch, in_ch, *([size] * d)))
    if name == "funit_d":
        return (x, torch.zeros(batch, dtype=torch.long))
    if name == "dan_restorer":
        return (x, torch.rand(batch, e.presets[preset]["input_para"]))
    return (x,)


CASES = [(name, mode) for name in sorted(REGISTRY) for mode in ("2d", "2p5d", "3d")]


@pytest.mark.parametrize("name, mode", CASES)
def test_tiny_forward_shapes(name, mode):
    e = REGISTRY[name]
    d = 3 if mode == "3d" else 2
    slab = 3 if mode == "2p5d" else 1
    size = e.min_size
    scales = [(1, 1, 1), (2, 2, 2), (1, 2, 2)] if name in TAKES_SCALE else [None]
    torch.manual_seed(0)
    for scale in scales:
        sz = scale[2] if (scale and mode == "2p5d") else 1  # HR slices per LR slice
        kw = {"scale": scale[:d] if scale and d == 3 else (scale[:2] if scale else None)}
        if e.kind == "estimator":
            net = build(name, d, "tiny", in_channels=slab, **kw)
            lr = torch.rand(2, slab, *([size] * d))
            sr = torch.rand(2, slab, *[size * s for s in kw["scale"]])
            out = net(sr, lr)
            assert out.shape == (2, e.presets["tiny"]["input_para"])
            continue
        net = build(name, d, "tiny", in_channels=slab, out_channels=sz, **kw)
        net.eval()
        with torch.no_grad():
            out = net(*_inputs(name, d, slab, size))
        if e.kind in ("generator", "conditional", "sr"):
            factor = kw["scale"] or [1] * d
            assert out.shape == (2, sz, *[size * f for f in factor]), (name, mode, scale, out.shape)
        elif name == "pix2pixhd_msd":
            assert len(out) == e.presets["tiny"]["num_D"] and all(o[-1].shape[1] == 1 for o in out)
        elif name in ("stargan_d", "funit_d"):
            assert out[0].shape[0] == 2
        else:
            assert out.shape[0] == 2 and out.shape[1] == 1
        assert n_parameters(net) < 100_000


GENERATORS = sorted(n for n, e in REGISTRY.items() if e.kind in ("generator", "sr", "conditional"))


@pytest.mark.parametrize("name", GENERATORS)
@pytest.mark.parametrize("preset", ["tiny", "cpu3d"])
def test_generators_script(name, preset):
    kw = {"scale": (1, 2, 2)} if name in TAKES_SCALE - {"dan_estimator"} else {}
    net = build(name, 3, preset, **kw).eval()
    scripted = torch.jit.script(net)
    size = REGISTRY[name].min_size if preset == "tiny" else 32  # cpu3d nets are deeper
    args = _inputs(name, 3, 1, size, batch=1, preset=preset)
    with torch.no_grad():
        torch.testing.assert_close(scripted(*args), net(*args))


def test_per_axis_pixel_shuffle_matches_torch_in_2d():
    from bone3d.nets.blocks import pixel_shuffle

    x = torch.rand(2, 12, 5, 7)
    torch.testing.assert_close(pixel_shuffle(x, [2, 2]), torch.nn.functional.pixel_shuffle(x, 2))
    y = pixel_shuffle(torch.rand(1, 8, 3, 4, 5), [1, 2, 4])
    assert y.shape == (1, 1, 3, 8, 20)


def test_bad_build_arguments():
    from bone3d.errors import InputError

    with pytest.raises(InputError, match="unknown network"):
        build("nope")
    with pytest.raises(InputError, match="preset"):
        build("unet", 3, "huge")
    with pytest.raises(InputError):
        build("edsr", 3, "tiny", scale=(1.5, 2, 2))
