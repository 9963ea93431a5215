"""Generator: one residual input head per modality in front of a shared MONAI BasicUNet backbone.

Shape contract: ``Generator.forward(x, modality)`` maps ``x`` of shape (B, C_in, X, Y, Z), float32, with
``C_in = MODALITY_CHANNELS[modality]`` (24 for ``pc-bssfp``/``bssfp``, 6 for ``t1w``/``dwi-tensor``), to the
normalised diffusion tensor (B, 6, X, Y, Z) in the component order D11 D12 D13 D22 D23 D33. The backbone
halves the grid four times, so X, Y and Z must be multiples of ``PATCH_MULTIPLE`` (16).
"""
from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass
from typing import Iterable

import torch
from monai.networks.nets import BasicUNet
from torch import nn

from bssfp2dt import modalities

logger = logging.getLogger(__name__)

MODALITY_CHANNELS: dict[str, int] = {modality.name: modality.channels for modality in modalities.MODALITIES}
HEAD_OUT_CHANNELS = 24  # every head maps its modality to this width, the backbone's input
TENSOR_CHANNELS = modalities.TENSOR_CHANNELS
PATCH_MULTIPLE = 16  # 2**4 for the backbone's four 2x poolings


@dataclass(frozen=True)
class GeneratorSize:
    """Widths of one generator size.

    ``features``: BasicUNet widths (encoder 5 levels, then the last up-block's width);
    ``head_hidden``: width of the two inner convolutions of each input head;
    ``dropout``: dropout probability in every backbone block;
    ``norm``: normalisation layers, ``"batch"`` (the reference method; needs GPU-sized batches) or ``"none"``
    (no normalisation: the output then does not depend on the batch, the batch size or the patch size, so
    CPU training at batch 1-4 and whole-volume inference give the same network);
    ``structure_scales``: Gaussian integration scales (voxels) of the structure-tensor features added to
    every head (empty: none; see :class:`StructureTensorFeatures`);
    ``cycle_profile``: the pc-bSSFP head also sees each voxel's phase-cycle profile free of its gain and common
    phase (:class:`PhaseCycleProfile`);
    ``input_shortcut``: each head's output shortcut also sees the head's own input channels (see
    :class:`InputHead`).
    """

    name: str
    features: tuple[int, int, int, int, int, int]
    head_hidden: int
    dropout: float
    norm: str = "batch"
    structure_scales: tuple[float, ...] = ()
    cycle_profile: bool = False
    input_shortcut: bool = False


GENERATOR_SIZES: dict[str, GeneratorSize] = {
    # The published network: ~51 M parameters, ~14 GiB of GPU memory at 64^3 patches, batch 1.
    "reference": GeneratorSize("reference", (48, 96, 192, 384, 768, 24), head_hidden=24, dropout=0.1),
    # CPU-friendly default (~1.5 M parameters).
    "small": GeneratorSize("small", (8, 16, 32, 64, 128, 8), head_hidden=16, dropout=0.1),
    # Unit tests only (< 100 k parameters).
    "tiny": GeneratorSize("tiny", (4, 8, 8, 16, 16, 4), head_hidden=4, dropout=0.0),
}
NORMS = ("batch", "none")
STRUCTURE_MAPS = 2  # learned contrast maps whose structure tensors feed each head
COMPONENT_PAIRS = ((0, 0), (0, 1), (0, 2), (1, 1), (1, 2), (2, 2))  # (row, column) of the BEP016 components
CONTRAST_HIDDEN = 16  # hidden channels of the contrast maps' 3x3x3 layer
VOXEL_MAP_HIDDEN = 64  # hidden channels of the per-voxel profile map
PROFILE_BOUND = 6.0  # standard deviations: the profile's shape channels are clipped there once fitted


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


def scale_anisotropy(log_tensor: torch.Tensor, gain: float) -> torch.Tensor:
    """Log-tensors (B, 6, ...) (BEP016 order) with the trace-free part times ``gain`` and the trace kept: in the
    log-Euclidean coordinates the eigenvectors and the MD stay, the anisotropy (FA) grows with ``gain``."""
    trace_third = (log_tensor[:, 0:1] + log_tensor[:, 3:4] + log_tensor[:, 5:6]) / 3.0
    isotropic = torch.zeros_like(log_tensor)
    isotropic[:, [0, 3, 5]] = trace_third
    return isotropic + gain * (log_tensor - isotropic)


class PhaseCycleProfile(nn.Module):
    """Shape of each voxel's phase-cycle profile from interleaved, normalised bSSFP channels (B, 2C, ...).

    The channels are turned back into complex cycles S_k = m_k exp(i p_k) (``magnitude_range`` and ``phase_range``:
    the normalisation's (low, high), set by :meth:`Generator.set_input_ranges`), and F_n, their discrete Fourier
    modes over the cycles (the profile's configuration modes), give: log |F_n| / |F_0| (n = 1..C-1);
    F_n F_-n / F_0^2 (n = 1..C/2-1, real and imaginary parts); F_n+1 conj(F_n) conj(F_1) F_0 / |F_0|^4
    (n = 1..C/2-2, both parts); and log of the mean normalised magnitude. Output (B, 3C - 6, ...) for even C.

    All but the last channel are unchanged by the voxel's gain (receive field, proton density), by a phase common
    to its cycles (transmit/receive phase, off-resonance at TE) and by a turn of the cycles (a global off-resonance
    of whole cycles: F_n gains the factor exp(2 pi i n k / C), which cancels in each product), and none wraps.
    What is left is the profile's shape, where the tissue's relaxation and the fibre's angle to B0 show: a
    per-voxel regressor on these shapes tells the angle on held-out subjects, a convolution on the raw wrapped
    phases hardly learns it (``docs/modalities.md``). Fixed, not learned."""

    EPSILON = 1e-7

    def __init__(self, in_channels: int):
        super().__init__()
        if in_channels % 4:
            raise ValueError(f"interleaved magnitude/phase channels of an even number of cycles, got {in_channels}")
        self.cycles = in_channels // 2
        self.register_buffer("magnitude_range", torch.tensor([0.0, 1.0]))
        self.register_buffer("phase_range", torch.tensor([-math.pi, math.pi]))

    @property
    def out_channels(self) -> int:
        return 3 * self.cycles - 6

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        low, high = self.magnitude_range[0], self.magnitude_range[1]
        normalised = x[:, 0::2].clamp_min(0.0).to(torch.float64)
        magnitude = low + normalised * (high - low)
        phase = self.phase_range[0] + x[:, 1::2].to(torch.float64) * (self.phase_range[1] - self.phase_range[0])
        modes = torch.fft.fft(torch.polar(magnitude, phase), dim=1)
        zero = modes[:, :1]
        power = zero.abs() + self.EPSILON * high
        half = self.cycles // 2
        parts = [torch.log(modes[:, 1:].abs() / power + 1e-6)]
        negative = modes[:, self.cycles - half + 1:].flip(1)  # F_-n, n = 1..C/2-1
        cross = modes[:, 1:half] * negative * zero.conj() ** 2 / power ** 4
        chain = modes[:, 2:half] * modes[:, 1:half - 1].conj() * modes[:, 1:2].conj() * zero / power ** 4
        parts += [cross.real, cross.imag, chain.real, chain.imag,
                  torch.log(normalised.mean(1, keepdim=True) + 1e-3)]
        return torch.cat(parts, dim=1).to(x.dtype)


class InputHead(nn.Module):
    """Residual block (B, C_in, X, Y, Z) -> (B, 24, X, Y, Z): three 3x3x3 convolutions with instance norm
    (``normalise``; none for the ``"none"`` generators) and ReLU, plus a 1x1x1 projection on the skip path
    when C_in != 24. With ``structure_scales`` the block also sees the input's structure-tensor features, and
    ``shortcut`` maps them straight to the 6 output channels (a 1x1x1 convolution, zero at the start): in log
    coordinates a fibre along the least-varying axis is close to a linear function of the normalised structure
    tensor, so the network starts from that linear guess and its UNet learns the rest (tract context, MD).
    With ``cycle_profile`` (pc-bSSFP) the block and the shortcut also see :class:`PhaseCycleProfile`'s features.
    With ``input_shortcut`` the shortcut also sees the input channels themselves: for the DWI tensor, whose
    network input is already in the output's log-Euclidean coordinates, its least-squares start is the identity,
    so a DT -> DT network starts at its input and its UNet learns only what the input lacks."""

    def __init__(self, in_channels: int, hidden: int, out_channels: int = HEAD_OUT_CHANNELS,
                 normalise: bool = True, structure_scales: tuple[float, ...] = (), cycle_profile: bool = False,
                 input_shortcut: bool = False):
        super().__init__()
        self.structure = StructureTensorFeatures(in_channels, structure_scales) if structure_scales else None
        self.profile = PhaseCycleProfile(in_channels) if cycle_profile else None
        auxiliary = sum(part.out_channels for part in (self.structure, self.profile) if part is not None)
        width = in_channels + auxiliary

        def norm(channels: int) -> nn.Module:
            return nn.InstanceNorm3d(channels, affine=True) if normalise else nn.Identity()

        self.body = nn.Sequential(
            nn.Conv3d(width, hidden, 3, padding=1), norm(hidden), nn.ReLU(),
            nn.Conv3d(hidden, hidden, 3, padding=1), norm(hidden), nn.ReLU(),
            nn.Conv3d(hidden, out_channels, 3, padding=1), norm(out_channels),
        )
        self.skip = nn.Identity() if in_channels == out_channels else nn.Conv3d(in_channels, out_channels, 1)
        self.activation = nn.ReLU()
        self.input_shortcut = input_shortcut
        self.shortcut = None
        if auxiliary or input_shortcut:
            self.shortcut = nn.Conv3d(auxiliary + (in_channels if input_shortcut else 0), TENSOR_CHANNELS, 1)
            nn.init.zeros_(self.shortcut.weight)
            nn.init.zeros_(self.shortcut.bias)
        self.voxel_map = None
        if self.profile is not None:
            # The profile's shape -> tensor map of one voxel is not linear (the angle to B0 shows as a ratio of
            # modes): a small per-voxel network on the standardised profile shape, zero at the start, fitted
            # before training (``training.initialisation``), added to the shortcut. It does not see the level
            # channel: that one follows each subject's gain, and a non-linear map of it extrapolates on a new
            # subject (docs/modalities.md); the linear shortcut has it.
            features = self.profile.out_channels - 1
            self.register_buffer("profile_mean", torch.zeros(features))
            self.register_buffer("profile_scale", torch.ones(features))
            # Set once the standardisation is fitted: from then on every path (body, shortcut, map) sees the
            # shape channels clipped to PROFILE_BOUND standard deviations, the range the map was fitted on; a
            # voxel far outside it (a dark band, the brain's edge) otherwise got an absurd tensor (MD 2e9 mm^2/s).
            self.register_buffer("profile_bounded", torch.zeros((), dtype=torch.bool))
            self.voxel_map = nn.Sequential(nn.Conv3d(features, VOXEL_MAP_HIDDEN, 1), nn.ReLU(),
                                           nn.Conv3d(VOXEL_MAP_HIDDEN, VOXEL_MAP_HIDDEN, 1), nn.ReLU(),
                                           nn.Conv3d(VOXEL_MAP_HIDDEN, TENSOR_CHANNELS, 1))
            nn.init.zeros_(self.voxel_map[-1].weight)
            nn.init.zeros_(self.voxel_map[-1].bias)
        # Gain of the output's trace-free (anisotropic) part, set after training by
        # ``training.calibration``: 1 leaves the output as the network computes it.
        self.register_buffer("anisotropy_gain", torch.ones(()))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Checkpoints written before the calibration existed have no gain: theirs is 1.
        state_dict.setdefault(prefix + "anisotropy_gain", torch.ones(()))
        if self.voxel_map is not None:  # nor had earlier profile maps a bound
            state_dict.setdefault(prefix + "profile_bounded", torch.zeros((), dtype=torch.bool))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features_and_shortcut(x)[0]

    def auxiliary_features(self, x: torch.Tensor) -> torch.Tensor | None:
        """Structure-tensor and phase-cycle profile features (B, F, ...) of the input, None without either."""
        parts = [] if self.structure is None else [self.structure(x)]
        if self.profile is not None:
            parts.append(self.bounded_profile(self.profile(x)))
        return torch.cat(parts, dim=1) if parts else None

    def bounded_profile(self, profile: torch.Tensor) -> torch.Tensor:
        """``profile`` features (B, P, ...) with the shape channels (all but the level) clipped to PROFILE_BOUND
        standard deviations of their training distribution once that is fitted (``profile_bounded``)."""
        if not bool(self.profile_bounded):
            return profile
        mean, scale = self._profile_statistics(profile.ndim)
        clipped = mean + scale * ((profile[:, :-1] - mean) / scale).clamp(-PROFILE_BOUND, PROFILE_BOUND)
        return torch.cat([clipped.to(profile.dtype), profile[:, -1:]], dim=1)

    def profile_shape(self, features):
        """The profile's shape channels (all its channels but the level) of auxiliary features whose last
        channels are the profile: tensors (B, F, ...) or voxel rows (N, F)."""
        return features[:, -self.profile.out_channels:-1]

    def _profile_statistics(self, ndim: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The shape channels' training mean and standard deviation, shaped (1, P - 1, 1, ...) for ``ndim`` dims."""
        shape = (1, -1) + (1,) * (ndim - 2)
        return self.profile_mean.reshape(shape), self.profile_scale.reshape(shape)

    def shortcut_inputs(self, x: torch.Tensor, auxiliary: torch.Tensor | None) -> torch.Tensor | None:
        """What the output shortcut sees (B, S, ...): the input itself (with ``input_shortcut``), then the
        auxiliary features; None when the head has no shortcut."""
        parts = ([x] if self.input_shortcut else []) + ([auxiliary] if auxiliary is not None else [])
        return torch.cat(parts, dim=1) if parts else None

    def standardised_profile(self, auxiliary: torch.Tensor) -> torch.Tensor:
        """The profile's shape channels (the last channels of ``auxiliary`` but its level), standardised: the
        voxel map's input."""
        mean, scale = self._profile_statistics(auxiliary.ndim)
        return (self.profile_shape(auxiliary) - mean) / scale

    def features_and_shortcut(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(backbone input (B, 24, ...), output shortcut (B, 6, ...) or None)."""
        auxiliary = self.auxiliary_features(x)
        body_input = x if auxiliary is None else torch.cat([x, auxiliary], dim=1)
        features = self.activation(self.body(body_input) + self.skip(x))
        if self.shortcut is None:
            return features, None
        shortcut = self.shortcut(self.shortcut_inputs(x, auxiliary))
        if self.voxel_map is not None:
            shortcut = shortcut + self.voxel_map(self.standardised_profile(auxiliary))
        return features, shortcut


class StructureTensorFeatures(nn.Module):
    """Local orientation of the input's anatomy: structure tensors of learned contrast maps and their axes.

    (B, C_in, X, Y, Z) -> (B, M (18 S + 2), X, Y, Z) with M = ``STRUCTURE_MAPS`` and S scales: each of M
    contrast maps c = tanh(3x3x3 conv, tanh, 1x1x1 conv of the input) gives gradients g (central differences) and,
    per ``scale`` (voxels), the six components of g g^T smoothed by a Gaussian and divided by their trace
    (orientation only, dimensionless), the dyadic a a^T of their least-varying axis a (smallest eigenvector)
    and c a a^T; then log(trace) at the first scale (edge strength) and the contrast map itself (tissue: the
    shortcut can then follow MD from tissue to tissue). Components in BEP016 order, map-minor.
    In white matter the fibre axis mostly runs along the direction in which the tissue varies least. In
    log-Euclidean coordinates a cylinder along a is log(l_radial) I + log(l_axial / l_radial) a a^T, linear in
    a a^T, and c a a^T lets that anisotropy differ between tissues: a 1x1x1 map of these features holds the
    non-learned anatomy predictor, which a UNet would find only slowly from raw intensities. The axes are
    computed without gradient (an eigenvector's gradient is unstable where eigenvalues meet); everything
    else is differentiable, so the contrast maps are learned. Borders are replicate-padded, so a patch's
    features do not see an artificial edge.
    """

    def __init__(self, in_channels: int, scales: tuple[float, ...], maps: int = STRUCTURE_MAPS):
        super().__init__()
        # One 3x3x3 layer (it averages the noise of single-cycle bSSFP channels) and a 1x1x1 layer: on
        # pc-bSSFP a linear map of the channels explains 29 % of the WM probability's variance, this one >50 %.
        self.contrast = nn.Sequential(nn.Conv3d(in_channels, CONTRAST_HIDDEN, 3, padding=1, padding_mode="replicate"),
                                      nn.Tanh(), nn.Conv3d(CONTRAST_HIDDEN, maps, 1))
        self.maps = maps
        self.scales = tuple(float(scale) for scale in scales)
        self.out_channels = maps * (18 * len(self.scales) + 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        contrast = torch.tanh(self.contrast(x))
        padded = nn.functional.pad(contrast, (1, 1, 1, 1, 1, 1), mode="replicate")
        gradients = [(padded[:, :, 2:, 1:-1, 1:-1] - padded[:, :, :-2, 1:-1, 1:-1]) / 2,
                     (padded[:, :, 1:-1, 2:, 1:-1] - padded[:, :, 1:-1, :-2, 1:-1]) / 2,
                     (padded[:, :, 1:-1, 1:-1, 2:] - padded[:, :, 1:-1, 1:-1, :-2]) / 2]
        products = torch.cat([gradients[i] * gradients[j] for i, j in COMPONENT_PAIRS], dim=1)  # (B, 6 M, ...)
        features = []
        for index in range(len(self.scales)):
            smoothed = gaussian_smooth(products, self.scales[index])
            trace = smoothed[:, 0:self.maps] + smoothed[:, 3 * self.maps:4 * self.maps] + smoothed[:, 5 * self.maps:]
            features.append(smoothed / (trace.repeat(1, 6, 1, 1, 1) + 1e-4))
            dyadic = least_varying_dyadic(smoothed, self.maps)
            features += [dyadic, contrast.repeat(1, 6, 1, 1, 1) * dyadic]
            if index == 0:
                features.append(torch.log(trace + 1e-4))
        return torch.cat(features + [contrast], dim=1)


def least_varying_dyadic(components: torch.Tensor, maps: int) -> torch.Tensor:
    """a a^T (B, 6 M, X, Y, Z), BEP016 order, map-minor, of the smallest eigenvector a of each symmetric tensor
    given by ``components`` (B, 6 M, X, Y, Z) in the same layout; computed without gradient, in float64 (the
    float32 solver loses accuracy on the near-degenerate tensors of flat regions)."""
    b, _, x, y, z = components.shape
    with torch.no_grad():
        six = components.detach().double().reshape(b, 6, maps, x, y, z).movedim(1, -1)
        matrix = six[..., [0, 1, 2, 1, 3, 4, 2, 4, 5]].reshape(*six.shape[:-1], 3, 3)
        axis = torch.linalg.eigh(matrix)[1][..., 0]  # (B, M, X, Y, Z, 3), eigenvalues ascending
        dyadic = torch.stack([axis[..., i] * axis[..., j] for i, j in COMPONENT_PAIRS], dim=1)  # (B, 6, M, ...)
    return dyadic.reshape(b, 6 * maps, x, y, z).to(components.dtype)


def smoothing_matrix(size: int, sigma: float, like: torch.Tensor) -> torch.Tensor:
    """(size, size) Gaussian smoothing (sigma in voxels, radius 3 sigma) with replicate borders: row i holds
    the weights of the samples that blur into sample i (rows sum to 1)."""
    radius = max(1, int(round(3 * sigma)))
    offsets = torch.arange(-radius, radius + 1, device=like.device)
    window = torch.exp(-0.5 * (offsets.to(like.dtype) / sigma) ** 2)
    window = window / window.sum()
    columns = (torch.arange(size, device=like.device)[:, None] + offsets[None]).clamp(0, size - 1)
    matrix = torch.zeros(size, size, dtype=like.dtype, device=like.device)
    return matrix.scatter_add_(1, columns, window.expand(size, -1).contiguous())


def gaussian_smooth(volume: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of (B, C, X, Y, Z) (sigma in voxels, replicate borders), one matrix product per
    axis: on a CPU about 10x faster than a depthwise conv3d of the same kernel."""
    x, y, z = volume.shape[2:]
    volume = torch.einsum("bcxyz,wz->bcxyw", volume, smoothing_matrix(z, sigma, volume))
    volume = torch.einsum("bcxyz,wy->bcxwz", volume, smoothing_matrix(y, sigma, volume))
    return torch.einsum("bcxyz,wx->bcwyz", volume, smoothing_matrix(x, sigma, volume))


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
        if self.size.norm not in NORMS:
            raise ValueError(f"unknown generator norm {self.size.norm!r}; choose one of {NORMS}")
        self.backbone = BasicUNet(
            spatial_dims=3, in_channels=HEAD_OUT_CHANNELS, out_channels=TENSOR_CHANNELS,
            features=self.size.features, act="PReLU", norm="batch" if self.size.norm == "batch" else None,
            dropout=self.size.dropout,
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
            profile = self.size.cycle_profile and modalities.get(modality).phase_cycled
            self.heads[modality] = InputHead(in_channels, self.size.head_hidden, normalise=self.size.norm == "batch",
                                             structure_scales=self.size.structure_scales,
                                             cycle_profile=profile,
                                             input_shortcut=self.size.input_shortcut).to(device)
        return self.heads[modality]

    def set_input_ranges(self, normalization) -> None:
        """Give every phase-cycle profile the bSSFP magnitude and phase ranges of ``normalization``
        (``preprocessing.normalization.Normalization``; its (low, high) map onto [0, 1])."""
        for head in self.heads.values():
            if head.profile is None:
                continue
            with torch.no_grad():
                for name in ("magnitude", "phase"):
                    value_range = normalization.require(name)
                    getattr(head.profile, f"{name}_range").copy_(torch.tensor([value_range.low, value_range.high]))

    def forward(self, x: torch.Tensor, modality: str) -> torch.Tensor:
        if modality not in self.heads:
            raise ValueError(f"generator has no head for {modality!r}; it has {list(self.heads)}")
        if x.ndim != 5 or x.shape[1] != MODALITY_CHANNELS[modality]:
            raise ValueError(f"{modality} input must be (B, {MODALITY_CHANNELS[modality]}, X, Y, Z), "
                             f"got {tuple(x.shape)}")
        if any(side % PATCH_MULTIPLE for side in x.shape[2:]):
            raise ValueError(f"patch sides must be multiples of {PATCH_MULTIPLE}, got {tuple(x.shape[2:])}")
        head = self.heads[modality]
        features, shortcut = head.features_and_shortcut(x)
        output = self.backbone(features)
        output = output if shortcut is None else output + shortcut
        gain = float(head.anisotropy_gain)
        return output if gain == 1.0 else scale_anisotropy(output, gain)

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


def build_generator(size: str | GeneratorSize, modalities: Iterable[str], **options) -> Generator:
    """Build a generator of the named size ("reference", "small", "tiny") with one head per modality;
    ``options`` replace fields of the size (``norm``, ``structure_scales``, ``dropout``)."""
    resolved = resolve_size(size)
    generator = Generator(dataclasses.replace(resolved, **options) if options else resolved, modalities)
    logger.debug("generator %s with heads %s: %d parameters", generator.size.name, generator.modalities,
                 count_parameters(generator))
    return generator


def count_parameters(module: nn.Module) -> int:
    """Number of scalar parameters (trainable or not) of ``module``; works on the meta device."""
    return sum(parameter.numel() for parameter in module.parameters())
