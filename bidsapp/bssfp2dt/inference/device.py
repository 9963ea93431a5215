"""The one place that decides where the network runs (nothing else asks torch about CUDA)."""
from __future__ import annotations

import logging
import re

import torch

from bssfp2dt.errors import UsageError

logger = logging.getLogger(__name__)
_CUDA_SPEC = re.compile(r"^cuda(:\d+)?$")


def resolve_device(spec: str = "auto") -> torch.device:
    """``auto`` -> the first CUDA GPU when one is usable, else the CPU; ``cpu``; ``cuda``/``cuda:N``.

    Asking for a GPU that is not there is a usage error (exit 64), not a silent fall-back.
    """
    spec = (spec or "auto").strip().lower()
    if spec == "auto":
        device = torch.device("cuda:0") if torch.cuda.is_available() else torch.device("cpu")
        logger.info("device: %s (auto)", _describe(device))
        return device
    if spec == "cpu":
        return torch.device("cpu")
    if not _CUDA_SPEC.match(spec):
        raise UsageError(f"--device {spec!r} is not one of auto, cpu, cuda, cuda:N")
    if not torch.cuda.is_available():
        raise UsageError(f"--device {spec}: no CUDA GPU is visible to this process; use --device cpu "
                         "(or run the container with --gpus all / apptainer --nv)")
    index = int(spec.split(":")[1]) if ":" in spec else 0
    if index >= torch.cuda.device_count():
        raise UsageError(f"--device {spec}: only {torch.cuda.device_count()} GPU(s) visible (cuda:0..."
                         f"cuda:{torch.cuda.device_count() - 1})")
    device = torch.device("cuda", index)
    logger.info("device: %s", _describe(device))
    return device


def is_cuda(device: torch.device) -> bool:
    return device.type == "cuda"


def free_memory_bytes(device: torch.device) -> int:
    """Free memory of a CUDA ``device`` in bytes (driver's view, other processes' use included)."""
    free, _ = torch.cuda.mem_get_info(device)
    return int(free)


def release_cached_memory(device: torch.device) -> None:
    """Return the CUDA caching allocator's unused blocks to the driver (after an out-of-memory error)."""
    if is_cuda(device):
        torch.cuda.empty_cache()


def configure_cpu_threads(omp_nthreads: int | None) -> None:
    """Limit torch's intra-op threads on the CPU (``--omp-nthreads``); None keeps torch's default."""
    if omp_nthreads:
        torch.set_num_threads(int(omp_nthreads))


def _describe(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return f"cpu ({torch.get_num_threads()} threads)"
