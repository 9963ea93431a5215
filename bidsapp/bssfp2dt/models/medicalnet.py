"""MedicalNet's ResNet-10 (Chen et al. 2019): the 3D feature network of the perceptual loss
(:class:`bssfp2dt.training.losses.PerceptualLoss`) and of the FID (:mod:`bssfp2dt.evaluation.metrics`).

Nothing is downloaded: the weights come from a local file.
"""
from __future__ import annotations

from pathlib import Path

import torch
from monai.networks.nets import resnet10
from torch import nn

from bssfp2dt.errors import MissingInputError


def build_medicalnet_resnet10() -> nn.Module:
    """MedicalNet's ResNet-10 layout (1 input channel, first conv 7^3 stride 2, type-B shortcuts without
    bias, no classifier), randomly initialised; ``load_medicalnet_weights`` fills it."""
    return resnet10(spatial_dims=3, n_input_channels=1, conv1_t_size=7, conv1_t_stride=2, shortcut_type="B",
                    bias_downsample=False, feed_forward=False)


def load_medicalnet_weights(network: nn.Module, path: Path | str) -> nn.Module:
    """Load MedicalNet weights from the local file ``path`` into ``network`` (strict).

    Accepts the released MedicalNet files (``{"state_dict": ...}`` with ``module.`` prefixes and a
    ``conv_seg`` segmentation head, which is dropped) and plain state dicts. MissingInputError naming
    the ``perceptual_weights`` file when it is absent, unreadable or of another architecture.
    """
    path = Path(path)
    if not path.is_file():
        raise MissingInputError(f"perceptual_weights file {path} does not exist; give the local MedicalNet "
                                f"ResNet-10 weights or leave the setting empty to disable the perceptual loss")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
        state = payload.get("state_dict", payload)
        state = {key.removeprefix("module."): value for key, value in state.items()
                 if not key.removeprefix("module.").startswith(("conv_seg", "fc."))}
        outcome = network.load_state_dict(state, strict=False)
    except Exception as error:  # unreadable pickle, wrong keys or shapes: all the user's file
        first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise MissingInputError(f"perceptual_weights file {path} is not MedicalNet ResNet-10 weights "
                                f"({first_line}); replace it") from None
    # Files saved before PyTorch 0.4.1 lack the batch-norm counters, which only matter for momentum=None.
    missing = [key for key in outcome.missing_keys if not key.endswith("num_batches_tracked")]
    if missing or outcome.unexpected_keys:
        raise MissingInputError(f"perceptual_weights file {path} is not MedicalNet ResNet-10 weights (missing "
                                f"{missing[:3]}, unexpected {outcome.unexpected_keys[:3]}); replace it")
    return network


def medicalnet_features(network: nn.Module, volume: torch.Tensor) -> torch.Tensor:
    """Layer-4 feature map (B, 512, ~X/32, ~Y/32, ~Z/32) of one-channel volumes (B, 1, X, Y, Z)."""
    x = network.act(network.bn1(network.conv1(volume)))
    if not network.no_max_pool:
        x = network.maxpool(x)
    return network.layer4(network.layer3(network.layer2(network.layer1(x))))
