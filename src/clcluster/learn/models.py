"""Encoders: a polar encoder (invariant to in-plane rotation by construction) and a plain CNN.

Both take images (b, D, D) float32 and return features (b, feature_dim); `ContrastiveModel`
adds the projection head used only by the loss.
"""
from __future__ import annotations


import torch
import torch.nn as nn
import torch.nn.functional as F

from clcluster.image.polar import grid_sample_coordinates, linear_radii, polar_coordinates


def polar_sampling_grid(box: int, n_radii: int, n_angles: int, r_min: float = 0.5, r_max: float | None = None) -> torch.Tensor:
    """grid_sample grid (1, n_radii, n_angles, 2) of a polar grid about pixel (box//2, box//2),
    angles counter-clockwise as in `imageops.polar_grid`."""
    r_max = box // 2 - 1 if r_max is None else r_max
    x, y = polar_coordinates(box, linear_radii(r_min, r_max, n_radii, torch), n_angles, xp=torch)
    return grid_sample_coordinates(x, y, box, torch)[None]


class PolarEncoder(nn.Module):
    """Resample to polar coordinates (radii x angles), convolve with circular padding along the
    angle axis, pool (mean and max) over angle: an in-plane rotation of the input is a circular
    shift along angle, which the pooling removes."""

    def __init__(self, box: int, feature_dim: int = 128, n_radii: int = 16, n_angles: int = 64,
                 channels: tuple[int, ...] = (32, 64, 64, 128, 128), angle_strides: tuple[int, ...] = (1, 2, 2, 2, 1),
                 r_max: float | None = None):
        super().__init__()
        self.register_buffer("grid", polar_sampling_grid(box, n_radii, n_angles, r_max=r_max), persistent=False)
        layers, c_in = [], 1
        for c_out, s in zip(channels, angle_strides):
            layers += [nn.Conv2d(c_in, c_out, 3, stride=(1, s), padding=(1, 0), bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]
            c_in = c_out
        self.convs = nn.ModuleList(layers)
        self.fc = nn.Linear(2 * c_in * n_radii, feature_dim)
        self.feature_dim = feature_dim

    def polar(self, images: torch.Tensor) -> torch.Tensor:
        x = images[:, None]
        grid = self.grid.expand(x.shape[0], -1, -1, -1)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=True)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.polar(images)  # (b, 1, R, A)
        for layer in self.convs:
            if isinstance(layer, nn.Conv2d):
                x = F.pad(x, (1, 1, 0, 0), mode="circular")  # circular along angle
            x = layer(x)
        feats = torch.cat([x.mean(dim=3), x.amax(dim=3)], dim=1)  # (b, 2C, R)
        return self.fc(feats.flatten(1))


class PlainCNN(nn.Module):
    """Five 3x3 conv + BN + ReLU layers with stride-2 downsampling and global average pooling."""

    def __init__(self, box: int, feature_dim: int = 128, channels: tuple[int, ...] = (32, 64, 64, 128, 128)):
        super().__init__()
        layers, c_in = [], 1
        for i, c_out in enumerate(channels):
            layers += [nn.Conv2d(c_in, c_out, 3, stride=1 if i == 0 else 2, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]
            c_in = c_out
        self.body = nn.Sequential(*layers)
        self.fc = nn.Linear(c_in, feature_dim)
        self.feature_dim = feature_dim

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.fc(self.body(images[:, None]).mean(dim=(2, 3)))


ENCODERS = {"polar": PolarEncoder, "cnn": PlainCNN}


def build_encoder(name: str, box: int, feature_dim: int = 128) -> nn.Module:
    try:
        return ENCODERS[name](box, feature_dim)
    except KeyError:
        raise ValueError(f"unknown encoder {name!r}; choose one of {sorted(ENCODERS)}") from None


class ContrastiveModel(nn.Module):
    """Encoder + 2-layer MLP projection head (SimCLR); features for clustering come from the encoder."""

    def __init__(self, encoder: nn.Module, projection_dim: int = 64):
        super().__init__()
        self.encoder = encoder
        d = encoder.feature_dim
        self.head = nn.Sequential(nn.Linear(d, d, bias=False), nn.BatchNorm1d(d), nn.ReLU(inplace=True), nn.Linear(d, projection_dim))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(images))


class _AllReduceSum(torch.autograd.Function):
    """Sum over ranks; the gradient of each rank's input is the sum of the output gradients."""

    @staticmethod
    def forward(ctx, x):
        import torch.distributed as dist

        x = x.clone()
        dist.all_reduce(x)
        return x

    @staticmethod
    def backward(ctx, g):
        import torch.distributed as dist

        g = g.clone()
        dist.all_reduce(g)
        return g


def all_reduce(x: torch.Tensor) -> torch.Tensor:
    return _AllReduceSum.apply(x)


class CrossRankBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm whose batch statistics are taken over all ranks (what torch's SyncBatchNorm does,
    which runs on CUDA only), on any device, with gradients through the statistics. Same
    parameters, buffers and state_dict keys as BatchNorm1d/2d; plain BatchNorm on one process
    or in eval mode. Two passes (mean, then centred variance) as a single-process BatchNorm does."""

    def _check_input_dim(self, x):
        if x.dim() < 2:
            raise ValueError(f"expected at least 2-D input, got {x.dim()}-D")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        if not (self.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        dims = [0] + list(range(2, x.dim()))
        shape = [1, -1] + [1] * (x.dim() - 2)
        xd = x.double()
        n_local = torch.tensor([x.numel() / x.shape[1]], dtype=torch.float64, device=x.device)
        s = all_reduce(torch.cat([xd.sum(dims), n_local]))
        n = s[-1]
        mean = s[:-1] / n
        var = all_reduce(((xd - mean.view(shape)) ** 2).sum(dims)) / n
        if self.track_running_stats and self.running_mean is not None:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.mul_(1 - m).add_(mean.to(self.running_mean.dtype), alpha=m)
                self.running_var.mul_(1 - m).add_((var * n / (n - 1)).to(self.running_var.dtype), alpha=m)
        y = (xd - mean.view(shape)) / torch.sqrt(var.view(shape) + self.eps)
        y = y.to(x.dtype)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y


def convert_sync_batchnorm(module: nn.Module) -> nn.Module:
    """BatchNorm layers → statistics over all ranks: torch's SyncBatchNorm on CUDA,
    `CrossRankBatchNorm` elsewhere (torch's refuses CPU tensors). Call after moving the model to
    its device: the parameters' device picks the implementation."""
    p = next(module.parameters(), None)
    dev = p.device if p is not None else torch.device("cpu")
    if dev.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    out = module
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, CrossRankBatchNorm):
        out = CrossRankBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                                 module.track_running_stats, device=dev, dtype=module.weight.dtype if module.affine else None)
        with torch.no_grad():
            if module.affine:
                out.weight.copy_(module.weight)
                out.bias.copy_(module.bias)
            if module.track_running_stats:
                out.running_mean.copy_(module.running_mean)
                out.running_var.copy_(module.running_var)
                out.num_batches_tracked.copy_(module.num_batches_tracked)
        out.train(module.training)
    for name, child in module.named_children():
        out.add_module(name, convert_sync_batchnorm(child))
    return out


def load_encoder(path, device="cpu"):
    """The trained encoder saved by `train.train` (evaluation mode, on `device`) and the saved payload
    (encoder kind, box in pixels, feature dimension, state dict)."""
    payload = torch.load(path, map_location=device, weights_only=True)
    enc = build_encoder(payload["encoder"], int(payload["box"]), int(payload["feature_dim"]))
    enc.load_state_dict(payload["state_dict"])
    return enc.to(device).eval(), payload
