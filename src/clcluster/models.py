"""Encoders: a polar encoder (invariant to in-plane rotation by construction) and a plain CNN.

Both take images (b, D, D) float32 and return features (b, feature_dim); `ContrastiveModel`
adds the projection head used only by the loss.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


def polar_sampling_grid(box: int, n_radii: int, n_angles: int, r_min: float = 0.5, r_max: float | None = None) -> torch.Tensor:
    """grid_sample grid (1, n_radii, n_angles, 2) of a polar grid about pixel (box//2, box//2),
    angles counter-clockwise as in `imageops.polar_grid`."""
    r_max = box // 2 - 1 if r_max is None else r_max
    r = torch.linspace(r_min, r_max, n_radii)[:, None]
    t = torch.arange(n_angles, dtype=torch.float32)[None, :] * (2 * math.pi / n_angles)
    c = box // 2
    x = c + r * torch.cos(t)
    y = c + r * torch.sin(t)
    # align_corners=True maps -1..1 to pixel centres 0..box-1
    gx = 2 * x / (box - 1) - 1
    gy = 2 * y / (box - 1) - 1
    return torch.stack([gx, gy], dim=-1)[None]


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
            layers += [nn.Conv2d(c_in, c_out, 3, stride=(1, s), padding=(1, 0)), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]
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
            layers += [nn.Conv2d(c_in, c_out, 3, stride=1 if i == 0 else 2, padding=1), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]
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
        self.head = nn.Sequential(nn.Linear(d, d), nn.BatchNorm1d(d), nn.ReLU(inplace=True), nn.Linear(d, projection_dim))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(images))
