"""Networks (generator, discriminator) and self-describing checkpoints; imports only torch and MONAI."""
from bssfp2dt.models.checkpoint import CheckpointMetadata, load_release_checkpoint, save_release_checkpoint
from bssfp2dt.models.discriminator import Discriminator, build_discriminator
from bssfp2dt.models.generator import (
    GENERATOR_SIZES, MODALITY_CHANNELS, PATCH_MULTIPLE, Generator, build_generator, count_parameters,
)

__all__ = ["CheckpointMetadata", "GENERATOR_SIZES", "MODALITY_CHANNELS", "PATCH_MULTIPLE", "Discriminator", "Generator",
           "build_discriminator", "build_generator", "count_parameters", "load_release_checkpoint",
           "save_release_checkpoint"]
