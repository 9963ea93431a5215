"""Generator: one residual input head per modality in front of a shared MONAI BasicUNet backbone.

Shape contract: ``Generator.forward(x, modality)`` maps ``x`` of shape (B, C_in, X, Y, Z), float32, with
``C_in = MODALITY_CHANNELS[modality]`` (24 for ``pc-bssfp``/``bssfp``, 6 for ``t1w``/``dwi-tensor``), to the
normalised diffusion tensor (B, 6, X, Y, Z) in the component order D11 D12 D13 D22 D23 D33. The backbone
halves the grid four times, so X, Y and Z must be multiples of ``PATCH_MULTIPLE`` (16).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Iterable

import torch
from monai.networks.nets import BasicUNet
from torch import nn

logger = logging.getLogger(__name__)

MODALITY_CHANNELS: dict[str, int] = {"pc-bssfp": 24, "bssfp": 24, "t1w": 6, "dwi-tensor": 6}
HEAD_OUT_CHANNELS = 24  # every head maps its modality to this width, the backbone's input
TENSOR_CHANNELS = 6
PATCH_MULTIPLE = 16  # 2**4 for the backbone's four 2x poolings


@dataclass(frozen=True)
class GeneratorSize:
    """Widths of one generator size.

    ``features``: BasicUNet widths (encoder 5 levels, then the last up-block's width);
    ``head_hidden``: width of the two inner convolutions of each input head;
    ``dropout``: dropout probability in every backbone block.
    """

    name: str
    features: tuple[int, int, int, int, int, int]
    head_hidden: int
    dropout: float


GENERATOR_SIZES: dict[str, GeneratorSize] = {
    # The published network: ~51 M parameters, ~14 GiB of GPU memory at 64^3 patches, batch 1.
    "reference": GeneratorSize("reference", (48, 96, 192, 384, 768, 24), head_hidden=24, dropout=0.1),
    # CPU-friendly default (~1.5 M parameters).
    "small": GeneratorSize("small", (8, 16, 32, 64, 128, 8), head_hidden=16, dropout=0.1),
    # Unit tests only (< 100 k parameters).
    "tiny": GeneratorSize("tiny", (4, 8, 8, 16, 16, 4), head_hidden=4, dropout=0.0),
}


def resolve_size(size: str | GeneratorSize) -> GeneratorSize:
    """Return the ``GeneratorSize`` named ``size`` (or ``size`` itself); ValueError for an unknown name."""
    if isinstance(size, GeneratorSize):
        return size
    try:
        return GENERATOR_SIZES[size]
    except KeyError:
        raise ValueError(f"unknown generator size {size!r}; choose one of {sorted(GENERATOR_SIZES)}") from None


def check_modality(modality: str) -> int:
    """Return the input channel count of ``modality``; ValueError for an unknown one."""
    try:
        return MODALITY_CHANNELS[modality]
    except KeyError:
        raise ValueError(f"unknown modality {modality!r}; choose one of {sorted(MODALITY_CHANNELS)}") from None


class InputHead(nn.Module):
    """Residual block (B, C_in, X, Y, Z) -> (B, 24, X, Y, Z): three 3x3x3 convolutions with instance norm and
    ReLU, plus a 1x1x1 projection on the skip path when C_in != 24."""

    def __init__(self, in_channels: int, hidden: int, out_channels: int = HEAD_OUT_CHANNELS):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv3d(in_channels, hidden, 3, padding=1), nn.InstanceNorm3d(hidden, affine=True), nn.ReLU(),
            nn.Conv3d(hidden, hidden, 3, padding=1), nn.InstanceNorm3d(hidden, affine=True), nn.ReLU(),
            nn.Conv3d(hidden, out_channels, 3, padding=1), nn.InstanceNorm3d(out_channels, affine=True),
        )
        self.skip = nn.Identity() if in_channels == out_channels else nn.Conv3d(in_channels, out_channels, 1)
        self.activation = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.activation(self.body(x) + self.skip(x))


class Generator(nn.Module):
    """Modality heads (``heads``, a ModuleDict keyed by modality) + shared BasicUNet ``backbone``.

    ``forward(x, modality)``: (B, C_in, X, Y, Z) -> (B, 6, X, Y, Z); X, Y, Z multiples of 16.
    Modules listed by ``freeze_batch_norm`` stay in eval mode (running statistics untouched) even after
    ``train()``, which Lightning calls at the start of each epoch.
    """

    def __init__(self, size: str | GeneratorSize, modalities: Iterable[str]):
        super().__init__()
        self.size = resolve_size(size)
        self.heads = nn.ModuleDict()
        self.backbone = BasicUNet(
            spatial_dims=3, in_channels=HEAD_OUT_CHANNELS, out_channels=TENSOR_CHANNELS,
            features=self.size.features, act="PReLU", norm="batch", dropout=self.size.dropout,
        )
        self._frozen_norm_names: tuple[str, ...] = ()
        for modality in modalities:
            self.add_head(modality)

    @property
    def modalities(self) -> tuple[str, ...]:
        """The modalities that have a head, in insertion order."""
        return tuple(self.heads.keys())

    def add_head(self, modality: str) -> InputHead:
        """Add (and return) a freshly initialised head for ``modality``; an existing head is kept as is."""
        in_channels = check_modality(modality)
        if modality not in self.heads:
            device = next(self.backbone.parameters()).device
            self.heads[modality] = InputHead(in_channels, self.size.head_hidden).to(device)
        return self.heads[modality]

    def forward(self, x: torch.Tensor, modality: str) -> torch.Tensor:
        if modality not in self.heads:
            raise ValueError(f"generator has no head for {modality!r}; it has {list(self.heads)}")
        if x.ndim != 5 or x.shape[1] != MODALITY_CHANNELS[modality]:
            raise ValueError(f"{modality} input must be (B, {MODALITY_CHANNELS[modality]}, X, Y, Z), "
                             f"got {tuple(x.shape)}")
        if any(side % PATCH_MULTIPLE for side in x.shape[2:]):
            raise ValueError(f"patch sides must be multiples of {PATCH_MULTIPLE}, got {tuple(x.shape[2:])}")
        return self.backbone(self.heads[modality](x))

    def set_output_offset(self, values) -> None:
        """Set the bias of the last convolution to ``values`` (6,), the normalised tensor a fresh network
        should predict: the mean target of the training data. The early steps then learn structure instead
        of spending hundreds of steps moving the output from 0 to the data's level."""
        bias = self.backbone.final_conv.bias
        with torch.no_grad():
            bias.copy_(torch.as_tensor(values, dtype=bias.dtype, device=bias.device).reshape(bias.shape))

    def freeze_batch_norm(self, module_names: Iterable[str]) -> None:
        """Keep the named batch-norm modules in eval mode from now on (empty iterable: release them)."""
        self._frozen_norm_names = tuple(module_names)
        self.train(self.training)

    def train(self, mode: bool = True) -> "Generator":
        super().train(mode)
        modules = dict(self.named_modules())
        for name in self._frozen_norm_names:
            modules[name].eval()
        return self


def build_generator(size: str | GeneratorSize, modalities: Iterable[str]) -> Generator:
    """Build a generator of the named size ("reference", "small", "tiny") with one head per modality."""
    generator = Generator(size, modalities)
    logger.debug("generator %s with heads %s: %d parameters", generator.size.name, generator.modalities,
                 count_parameters(generator))
    return generator


def count_parameters(module: nn.Module) -> int:
    """Number of scalar parameters (trainable or not) of ``module``; works on the meta device."""
    return sum(parameter.numel() for parameter in module.parameters())
