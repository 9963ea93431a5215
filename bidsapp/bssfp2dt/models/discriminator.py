"""PatchGAN discriminator on concat(input, tensor), with one first layer per input modality.

Shape contract: ``Discriminator.forward(source, tensor, modality)`` takes ``source`` (B, C_in, X, Y, Z)
(C_in = 24 for bSSFP, 6 for T1w/DT) and ``tensor`` (B, 6, X, Y, Z), concatenates them to 30 or 12 channels and
returns a map of real/fake logits (B, 1, X/8, Y/8, Z/8) for X, Y, Z multiples of 8: three stride-2 layers
then two stride-1 layers, so each logit judges one local patch of the volume.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import torch
from torch import nn

from bssfp2dt.models.generator import TENSOR_CHANNELS, check_modality

LEAKY_SLOPE = 0.2


@dataclass(frozen=True)
class DiscriminatorSize:
    """``base_features``: width of the first layer; it doubles at each of the next three layers."""

    name: str
    base_features: int


DISCRIMINATOR_SIZES: dict[str, DiscriminatorSize] = {
    "reference": DiscriminatorSize("reference", 64),
    "small": DiscriminatorSize("small", 16),
    "tiny": DiscriminatorSize("tiny", 4),
}


def _block(in_channels: int, out_channels: int, stride: int, batch_norm: bool) -> nn.Sequential:
    # Kernel 4 for the stride-2 layers (pix2pix), 3 for stride 1 so the grid keeps its size.
    kernel = 4 if stride == 2 else 3
    layers: list[nn.Module] = [nn.Conv3d(in_channels, out_channels, kernel, stride=stride, padding=1,
                                         bias=not batch_norm)]
    if batch_norm:
        layers.append(nn.BatchNorm3d(out_channels))
    layers.append(nn.LeakyReLU(LEAKY_SLOPE))
    return nn.Sequential(*layers)


class Discriminator(nn.Module):
    """Five 3D convolutions: a per-modality first layer (``first_layers``, ModuleDict) then a shared trunk."""

    def __init__(self, size: str | DiscriminatorSize, modalities: Iterable[str]):
        super().__init__()
        self.size = size if isinstance(size, DiscriminatorSize) else _resolve(size)
        width = self.size.base_features
        self.first_layers = nn.ModuleDict()
        self.trunk = nn.Sequential(
            _block(width, 2 * width, stride=2, batch_norm=True),
            _block(2 * width, 4 * width, stride=2, batch_norm=True),
            _block(4 * width, 8 * width, stride=1, batch_norm=True),
            nn.Conv3d(8 * width, 1, 3, stride=1, padding=1),
        )
        for modality in modalities:
            self.add_modality(modality)

    def add_modality(self, modality: str) -> nn.Module:
        """Add (and return) a first layer taking ``modality``'s channels + 6 tensor channels."""
        in_channels = check_modality(modality) + TENSOR_CHANNELS
        if modality not in self.first_layers:
            device = next(self.trunk.parameters()).device
            # No batch norm on the first layer, as in pix2pix.
            self.first_layers[modality] = _block(in_channels, self.size.base_features, stride=2,
                                                 batch_norm=False).to(device)
        return self.first_layers[modality]

    def forward(self, source: torch.Tensor, tensor: torch.Tensor, modality: str) -> torch.Tensor:
        if modality not in self.first_layers:
            raise ValueError(f"discriminator has no first layer for {modality!r}; it has {list(self.first_layers)}")
        return self.trunk(self.first_layers[modality](torch.cat([source, tensor], dim=1)))


def _resolve(size: str) -> DiscriminatorSize:
    try:
        return DISCRIMINATOR_SIZES[size]
    except KeyError:
        raise ValueError(f"unknown discriminator size {size!r}; choose one of {sorted(DISCRIMINATOR_SIZES)}") from None


def build_discriminator(size: str | DiscriminatorSize, modalities: Iterable[str]) -> Discriminator:
    """Build a PatchGAN of the named size ("reference", "small", "tiny") for the given input modalities."""
    return Discriminator(size, modalities)
