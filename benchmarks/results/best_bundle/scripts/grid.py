"""The affine of a prediction on a grid ``scale`` times finer than its input's (same corner).

MONAI's sliding-window inference up-samples the values of a post-upsampling network but keeps the
input's affine; this sets the finer grid's, as bone3d's ``VolumePredictor`` does.
"""

import torch


def upsampled_grid(scale: int):
    def fix(t):
        a = torch.as_tensor(t.affine, dtype=torch.float64).clone()
        sp = torch.linalg.norm(a[:3, :3], dim=0)
        direction = a[:3, :3] / sp
        fine = sp / scale
        a[:3, 3] = a[:3, 3] - direction @ (fine * (scale - 1) / 2.0)
        a[:3, :3] = direction * fine
        t.affine = a
        return t

    return fix
