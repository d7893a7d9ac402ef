"""FUNIT (Liu et al., ICCV 2019): few-shot unsupervised image translation.

As in NVlabs/FUNIT ``networks.py``: a class encoder (7x7 stem, 4x4 stride-2 convolutions, global
average pooling, 1x1 to the latent class code), a content encoder (instance-normalised
downsampling and ResNet blocks), a decoder whose ResNet blocks use AdaIN with parameters produced
by an MLP from the class code, nearest x2 upsampling + 5x5 convolutions and a 7x7 tanh output;
the discriminator is a multi-task patch discriminator of activation-first ResNet blocks with
average pooling and one output map per class. Reflection padding throughout. AdaIN here takes its
parameters as a tensor instead of module attributes, so the generator is TorchScript-able.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from bone3d.nets.blocks import ReflectPad, avg_pool, centre_offset, conv, norm


class _Block(nn.Module):
    """Reflect pad -> conv -> [instance norm] -> activation (FUNIT's Conv2dBlock)."""

    def __init__(
        self, d, cin, cout, k, stride, pad, use_norm=False, act="relu", act_first=False, bias=True
    ):
        super().__init__()
        self.pad = ReflectPad(d, pad) if pad > 0 else nn.Identity()
        self.conv = conv(d, cin, cout, k, stride=stride, padding=0, bias=bias)
        self.norm = norm(d, "instance", cout) if use_norm else nn.Identity()
        self.act = act
        self.act_first = act_first

    def _act(self, x: torch.Tensor) -> torch.Tensor:
        if self.act == "relu":
            return F.relu(x)
        if self.act == "lrelu":
            return F.leaky_relu(x, 0.2)
        if self.act == "tanh":
            return torch.tanh(x)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.act_first:
            return self.norm(self.conv(self.pad(self._act(x))))
        return self._act(self.norm(self.conv(self.pad(x))))


class _ResBlock(nn.Module):
    def __init__(self, d, ch, use_norm):
        super().__init__()
        self.c1 = _Block(d, ch, ch, 3, 1, 1, use_norm, "relu")
        self.c2 = _Block(d, ch, ch, 3, 1, 1, use_norm, "none")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.c2(self.c1(x))


def _adain(
    x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, eps: float = 1e-5
) -> torch.Tensor:
    dims = [i for i in range(2, x.dim())]
    mu = x.mean(dim=dims, keepdim=True)
    var = x.var(dim=dims, keepdim=True, unbiased=False)
    shape = [x.shape[0], x.shape[1]] + [1] * (x.dim() - 2)
    return (x - mu) / torch.sqrt(var + eps) * std.reshape(shape) + mean.reshape(shape)


class _AdaINResBlock(nn.Module):
    def __init__(self, d, ch):
        super().__init__()
        self.pad1 = ReflectPad(d, 1)
        self.conv1 = conv(d, ch, ch, 3, padding=0)
        self.pad2 = ReflectPad(d, 1)
        self.conv2 = conv(d, ch, ch, 3, padding=0)
        self.ch = ch

    def forward(self, x: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        c = self.ch
        h = F.relu(_adain(self.conv1(self.pad1(x)), p[:, 0:c], p[:, c : 2 * c]))
        h = _adain(self.conv2(self.pad2(h)), p[:, 2 * c : 3 * c], p[:, 3 * c : 4 * c])
        return x + h


class FUNITGenerator(nn.Module):
    """``forward(x, class_images)``: content (B, C, *S) translated to the class of
    ``class_images`` (B, C, *S'), one class example per content image."""

    def __init__(
        self, spatial_dims: int = 2, in_channels: int = 1, out_channels: int = 1, nf: int = 64,
        nf_mlp: int = 256, n_downs_class: int = 4, n_downs_content: int = 3, n_mlp_blks: int = 3,
        n_res_blks: int = 2, latent_dim: int = 64,
    ):  # fmt: skip
        super().__init__()
        d = spatial_dims
        cls: list[nn.Module] = [_Block(d, in_channels, nf, 7, 1, 3)]
        dim = nf
        for _ in range(2):
            cls.append(_Block(d, dim, dim * 2, 4, 2, 1))
            dim *= 2
        for _ in range(n_downs_class - 2):
            cls.append(_Block(d, dim, dim, 4, 2, 1))
        self.enc_class = nn.Sequential(*cls)
        self.class_out = conv(d, dim, latent_dim, 1, padding=0)
        content: list[nn.Module] = [_Block(d, in_channels, nf, 7, 1, 3, use_norm=True)]
        dim = nf
        for _ in range(n_downs_content):
            content.append(_Block(d, dim, dim * 2, 4, 2, 1, use_norm=True))
            dim *= 2
        content += [_ResBlock(d, dim, True) for _ in range(n_res_blks)]
        self.enc_content = nn.Sequential(*content)
        self.dec_res = nn.ModuleList([_AdaINResBlock(d, dim) for _ in range(n_res_blks)])
        up: list[nn.Module] = []
        for _ in range(n_downs_content):
            up += [
                nn.Upsample(scale_factor=2.0, mode="nearest"),
                _Block(d, dim, dim // 2, 5, 1, 2, use_norm=True),
            ]
            dim //= 2
        up.append(_Block(d, dim, out_channels, 7, 1, 3, act="tanh"))
        self.dec_up = nn.Sequential(*up)
        n_adain = 4 * self.dec_res[0].ch * n_res_blks if n_res_blks > 0 else 0
        mlp: list[nn.Module] = [nn.Linear(latent_dim, nf_mlp), nn.ReLU(True)]
        for _ in range(n_mlp_blks - 2):
            mlp += [nn.Linear(nf_mlp, nf_mlp), nn.ReLU(True)]
        mlp.append(nn.Linear(nf_mlp, n_adain))
        self.mlp = nn.Sequential(*mlp)
        self.res_ch = dim * 2**n_downs_content

    def class_code(self, images: torch.Tensor) -> torch.Tensor:
        h = self.enc_class(images)
        dims = [i for i in range(2, h.dim())]
        return self.class_out(h.mean(dim=dims, keepdim=True)).reshape(h.shape[0], -1)

    def decode(self, content: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
        p = self.mlp(code)
        h = content
        i = 0
        step = 4 * self.res_ch
        for block in self.dec_res:
            h = block(h, p[:, i * step : (i + 1) * step])
            i += 1
        return self.dec_up(h)

    def forward(self, x: torch.Tensor, class_images: torch.Tensor) -> torch.Tensor:
        return self.decode(self.enc_content(x), self.class_code(class_images))


class FUNITTranslator(nn.Module):
    """A `FUNITGenerator` with a stored target-class code: ``forward(x)`` translates ``x`` to the
    class whose code is in the buffer ``class_code`` (input key ``image`` alone, for bundles,
    inference and export).

    ``generator`` is the one trained; ``generator_test`` (a copy, no gradients) is its
    exponential moving average, which ``forward`` runs: NVlabs/FUNIT
    keeps ``gen_test``, updated after every generator step by ``update_average`` with beta 0.999,
    and translates with it at test time. The reference trains for 100k+ iterations; our CPU runs
    take hundreds, in which a fixed 0.999 would keep most of the random start, so `update_test`
    ramps the decay as TensorFlow's ``ExponentialMovingAverage(num_updates=...)`` does:
    ``min(ema_decay, (1 + n) / (10 + n))`` after n updates (the reference's 0.999 from n = 8990 on).

    FUNIT's test time averages the class codes of K example images of the target class; here the
    examples are all target-domain (micro-CT) patches seen in training: `update_class_code` keeps
    their running mean (exact mean over the first ``1 / momentum`` batches, then an exponential
    average that follows the class encoder of ``generator_test``). Channels as in
    `StarGANTranslator`: ``G`` maps ``in_channels`` to ``in_channels``, ``out_channels`` keeps the
    centre ones.

    ``inference_only=True`` builds ``generator_test`` and the buffers alone (no trained
    ``generator``, about half the weights): what ``bone3d export`` writes (`EXPORT_ARGS`); its
    state dict is the full one less the ``generator.`` entries, and it loads a training
    checkpoint too (strictly, those entries set aside), as MONAI's ``ckpt_export`` does.
    """

    EXPORT_ARGS = {"inference_only": True}

    def __init__(
        self, spatial_dims: int = 2, in_channels: int = 1, out_channels: int = 1, nf: int = 64,
        nf_mlp: int = 256, n_downs_class: int = 4, n_downs_content: int = 3, n_mlp_blks: int = 3,
        n_res_blks: int = 2, latent_dim: int = 64, momentum: float = 0.01,
        ema_decay: float = 0.999, inference_only: bool = False,
    ):  # fmt: skip
        super().__init__()
        if not 0.0 <= ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {ema_decay}")
        self.first = centre_offset(in_channels, out_channels)
        generator = FUNITGenerator(
            spatial_dims, in_channels, in_channels, nf, nf_mlp, n_downs_class, n_downs_content,
            n_mlp_blks, n_res_blks, latent_dim,
        )  # fmt: skip
        self.ema_decay = float(ema_decay)
        if not inference_only:
            self.generator = generator
            generator = copy.deepcopy(generator)
        self.generator_test = generator.requires_grad_(False)
        self.register_buffer("n_averaged", torch.zeros((), dtype=torch.long))
        self.register_buffer("class_code", torch.zeros(1, latent_dim))
        self.register_buffer("n_codes", torch.zeros((), dtype=torch.long))
        self.momentum = float(momentum)
        self.out_channels = out_channels

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        if not hasattr(self, "generator"):  # inference-only: the trained generator is not held
            state_dict = {k: v for k, v in state_dict.items() if not k.startswith("generator.")}
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    @torch.jit.unused
    def update_test(self) -> None:
        """Fold the trained ``generator``'s weights into ``generator_test`` (after each G step;
        the first call copies them; ramped decay, see the class docstring).

        Written out rather than ``torch.optim.swa_utils.AveragedModel``, whose ``forward(*args)``
        cannot be compiled by TorchScript (the translator is scripted, `test_nets`)."""
        with torch.no_grad():
            n = int(self.n_averaged)
            decay = min(self.ema_decay, (1.0 + n) / (10.0 + n)) if n else 0.0
            for avg, cur in zip(
                self.generator_test.parameters(), self.generator.parameters(), strict=True
            ):
                avg.lerp_(cur, 1.0 - decay)
            self.n_averaged.add_(1)

    @torch.jit.unused
    def update_class_code(self, codes: torch.Tensor) -> None:
        """Fold a batch of target-class codes (B, latent_dim) into the stored mean."""
        with torch.no_grad():
            n = int(self.n_codes) + 1
            w = max(1.0 / n, self.momentum)
            self.class_code.mul_(1.0 - w).add_(w * codes.detach().mean(0, keepdim=True))
            self.n_codes.fill_(n)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        code = self.class_code.expand(x.shape[0], -1)
        g = self.generator_test
        y = g.decode(g.enc_content(x), code)
        return y[:, self.first : self.first + self.out_channels]


class _ActFirstRes(nn.Module):
    def __init__(self, d, fin, fout):
        super().__init__()
        hid = min(fin, fout)
        self.c0 = _Block(d, fin, hid, 3, 1, 1, act="lrelu", act_first=True)
        self.c1 = _Block(d, hid, fout, 3, 1, 1, act="lrelu", act_first=True)
        self.shortcut = (
            conv(d, fin, fout, 1, padding=0, bias=False) if fin != fout else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.shortcut(x) + self.c1(self.c0(x))


class FUNITDiscriminator(nn.Module):
    """``forward(x, y)`` -> (logit map of class y (B, *S'), features)."""

    def __init__(
        self,
        spatial_dims: int = 2,
        in_channels: int = 1,
        nf: int = 64,
        n_res_blks: int = 10,
        num_classes: int = 119,
    ):
        super().__init__()
        d = spatial_dims
        if n_res_blks % 2:
            raise ValueError("n_res_blks must be even")
        layers: list[nn.Module] = [_Block(d, in_channels, nf, 7, 1, 3, act="none")]
        for _ in range(n_res_blks // 2 - 1):
            nf_out = min(nf * 2, 1024)
            layers += [
                _ActFirstRes(d, nf, nf),
                _ActFirstRes(d, nf, nf_out),
                ReflectPad(d, 1),
                avg_pool(d, 3, 2),
            ]
            nf = nf_out
        nf_out = min(nf * 2, 1024)
        layers += [_ActFirstRes(d, nf, nf), _ActFirstRes(d, nf, nf_out)]
        self.cnn_f = nn.Sequential(*layers)
        self.cnn_c = _Block(d, nf_out, num_classes, 1, 1, 0, act="lrelu", act_first=True)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feat = self.cnn_f(x)
        out = self.cnn_c(feat)
        idx = torch.arange(out.shape[0], device=out.device)
        return out[idx, y], feat


PRESETS_G = {
    "paper": {
        "nf": 64,
        "nf_mlp": 256,
        "n_downs_class": 4,
        "n_downs_content": 3,
        "n_mlp_blks": 3,
        "n_res_blks": 2,
        "latent_dim": 64,
    },
    "cpu3d": {
        "nf": 16,
        "nf_mlp": 64,
        "n_downs_class": 3,
        "n_downs_content": 2,
        "n_mlp_blks": 3,
        "n_res_blks": 2,
        "latent_dim": 32,
    },
    "tiny": {
        "nf": 4,
        "nf_mlp": 16,
        "n_downs_class": 2,
        "n_downs_content": 2,
        "n_mlp_blks": 2,
        "n_res_blks": 1,
        "latent_dim": 8,
    },
}
PRESETS_T = PRESETS_G
PRESETS_D = {
    "paper": {"nf": 64, "n_res_blks": 10, "num_classes": 119},
    "cpu3d": {"nf": 16, "n_res_blks": 6, "num_classes": 2},
    "tiny": {"nf": 4, "n_res_blks": 4, "num_classes": 2},
}
