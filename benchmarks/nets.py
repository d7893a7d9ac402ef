"""Network zoo cost on this machine: for each model's ``cpu3d`` preset, parameters, multiply-
accumulates (MACs) per output voxel and forward seconds per 64^3 output patch (batch 1, CPU).

SR models get a x2 input (32^3 -> 64^3); discriminators and the DAN estimator are timed on a
64^3 input (their MACs are per *input* voxel). MACs count convolutions, transposed convolutions
and linear layers (forward hooks), which dominate these networks.

    .venv/bin/python benchmarks/nets.py [--repeats 3] [--only NAME ...]
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn

from bone3d.nets import REGISTRY, build, n_parameters

SR = ("fsrcnn", "edsr", "rcan", "rrdb", "r2rcan", "dan_restorer", "dan_estimator")


def count_macs(model: nn.Module, args) -> int:
    total = [0]

    def hook(mod, inp, out):
        if isinstance(mod, nn.Linear):
            total[0] += out.numel() * mod.in_features
        else:  # conv / transposed conv: each output element sums in/groups * kernel volume
            k = 1
            for v in mod.kernel_size:
                k *= v
            if isinstance(mod, nn.modules.conv._ConvTransposeNd):
                total[0] += inp[0].numel() * mod.out_channels // mod.groups * k
            else:
                total[0] += out.numel() * mod.in_channels // mod.groups * k

    hooks = [
        m.register_forward_hook(hook)
        for m in model.modules()
        if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear))
    ]
    with torch.no_grad():
        model(*args)
    for h in hooks:
        h.remove()
    return total[0]


def inputs(name: str, size: int):
    e = REGISTRY[name]
    p = e.presets["cpu3d"]
    x = torch.rand(1, 1, size, size, size)
    if name == "stargan_g":
        return (x, torch.eye(p["c_dim"])[:1])
    if name == "funit_g":
        return (x, torch.rand(1, 1, size, size, size))
    if name == "funit_d":
        return (x, torch.zeros(1, dtype=torch.long))
    if name == "dan_restorer":
        return (x, torch.rand(1, p["input_para"]))
    if name == "dan_estimator":
        return (torch.rand(1, 1, 2 * size, 2 * size, 2 * size), x)
    return (x,)


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--only", nargs="*")
    args = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    print(f"{'model':18s} {'kind':14s} {'params':>11s} {'MACs/voxel':>12s} {'s / 64^3':>9s}")
    for name, entry in REGISTRY.items():
        if args.only and name not in args.only:
            continue
        kw = {"scale": 2} if name in SR else {}
        net = build(name, 3, "cpu3d", **kw).eval()
        size = 32 if name in SR and name != "dan_estimator" else 64
        if name == "dan_estimator":
            size = 32
        x = inputs(name, size)
        macs = count_macs(net, x)
        out_vox = 64**3
        with torch.no_grad():
            net(*x)  # warm-up
            t0 = time.perf_counter()
            for _ in range(args.repeats):
                net(*x)
            dt = (time.perf_counter() - t0) / args.repeats
        print(
            f"{name:18s} {entry.kind:14s} {n_parameters(net):11,d} {macs / out_vox:12,.0f} {dt:9.3f}"
        )


if __name__ == "__main__":
    main()
