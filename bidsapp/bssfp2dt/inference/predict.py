"""Whole-volume prediction with MONAI's sliding window (Gaussian blending of overlapping patches).

Also the memory side of inference: the sliding-window batch is the largest one (up to ``--batch-size``)
whose estimated activations fit the memory left (``--mem`` on the CPU, the free GPU memory on CUDA), and
a CUDA out-of-memory error retries once with half the batch, then predicts on the CPU.
"""
from __future__ import annotations

import logging
import os
from contextlib import nullcontext
from typing import Callable, Sequence, TypeVar

import numpy as np
import torch
from monai.inferers import sliding_window_inference

from bssfp2dt.inference.device import free_memory_bytes, is_cuda, release_cached_memory

logger = logging.getLogger(__name__)

MIB = 2 ** 20
FLOAT_BYTES = 4  # activations and sliding-window buffers are float32 (bf16 on CUDA only makes them smaller)
Result = TypeVar("Result")


def predict_volume(predictor: Callable[[torch.Tensor], torch.Tensor], volume: np.ndarray, *,
                   patch_size: int = 64, overlap: float = 0.5, batch_size: int = 1,
                   device: torch.device = torch.device("cpu"), mask: np.ndarray | None = None,
                   out_channels: int | None = None, progress: bool = False) -> np.ndarray:
    """Predict a whole volume patch by patch.

    ``volume`` (C, X, Y, Z) float32 (normalised network input); ``predictor`` maps a batch of patches
    (B, C, P, P, P) to (B, C_out, P, P, P). Patches of edge ``patch_size`` overlap by ``overlap`` (0..1)
    and are blended with Gaussian weights; the volume is zero-padded where smaller than a patch.
    ``batch_size`` patches run at once. On CUDA the predictor runs under bf16 autocast with
    channels-last memory. Returns (C_out, X, Y, Z) float32, zero outside ``mask`` (X, Y, Z) when given.
    """
    if not 0.0 <= overlap < 1.0:
        raise ValueError(f"overlap must be in [0, 1), got {overlap}")
    inputs = torch.from_numpy(np.ascontiguousarray(volume, dtype=np.float32))[None].to(device)
    if is_cuda(device):
        inputs = inputs.contiguous(memory_format=torch.channels_last_3d)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if is_cuda(device) else nullcontext()

    def run(patches: torch.Tensor) -> torch.Tensor:
        return predictor(patches).float()

    with torch.inference_mode(), autocast:
        output = sliding_window_inference(inputs, roi_size=(patch_size,) * 3, sw_batch_size=batch_size,
                                          predictor=run, overlap=overlap, mode="gaussian", padding_mode="constant",
                                          cval=0.0, progress=progress)
    result = output[0].float().cpu().numpy()
    if out_channels is not None and result.shape[0] != out_channels:
        raise ValueError(f"the network returned {result.shape[0]} channels, expected {out_channels}")
    if mask is not None:
        result *= np.asarray(mask, dtype=bool)[None]
    return result


# --------------------------------------------------------------------------- memory-sized batch
def patch_activation_bytes(predictor: Callable[[torch.Tensor], torch.Tensor], in_channels: int, patch_size: int,
                           probe_size: int, device: torch.device = torch.device("cpu")) -> int:
    """Upper bound of the memory (bytes) the forward pass of one ``patch_size``^3 patch needs.

    Runs ``predictor`` once, in float32, on a zero probe (1, ``in_channels``, ``probe_size``^3) on
    ``device`` and adds up the bytes of every distinct tensor that enters or leaves any torch module (the
    probe's input and output included), all kept alive for the count; then scales by
    ``(patch_size / probe_size)^3``: a fully convolutional network's activations grow with the voxel count
    (exact when both edges are multiples of the network's down-sampling factor). Counting everything as
    alive at once over-states the peak: on a CPU with 64^3 patches the count is 399 MiB against a measured
    133 MiB per patch (peak resident memory, batch 1 to 2) for the small generator, and 1187 MiB against
    520 MiB for the reference one.
    """
    probe = torch.zeros((1, in_channels) + (probe_size,) * 3, dtype=torch.float32, device=device)
    tensors: list[torch.Tensor] = [probe]

    def keep(module, inputs, output):
        for value in (*inputs, *(output if isinstance(output, (tuple, list)) else (output,))):
            if isinstance(value, torch.Tensor):
                tensors.append(value)

    handle = torch.nn.modules.module.register_module_forward_hook(keep)
    try:
        with torch.inference_mode():
            tensors.append(predictor(probe))
    finally:
        handle.remove()
    storages = {tensor.untyped_storage().data_ptr(): tensor.untyped_storage().nbytes() for tensor in tensors}
    return int(np.ceil(sum(storages.values()) * (patch_size / probe_size) ** 3))


def sliding_window_buffer_bytes(volume_shape: Sequence[int], out_channels: int, patch_size: int) -> int:
    """Bytes of the whole-volume buffers of one prediction, independent of the batch.

    MONAI's output and weight accumulators (``out_channels`` + 1) and the returned copy (``out_channels``),
    float32, over the volume ``(C, X, Y, Z)`` zero-padded to at least one patch per axis.
    """
    voxels = int(np.prod([max(int(n), patch_size) for n in volume_shape[1:]]))
    return FLOAT_BYTES * voxels * (2 * out_channels + 1)


def memory_budget_bytes(mem_mb: int | None, device: torch.device, buffer_bytes: int) -> int | None:
    """Bytes one sliding-window batch may use, after the whole-volume buffers; None when unbounded.

    CPU: ``--mem`` (``mem_mb``, MB = 2^20 bytes) minus this process's resident memory; no ``--mem``, no
    bound. CUDA: the GPU's free memory (the patches live there; ``--mem`` is host memory).
    """
    if is_cuda(device):
        available = free_memory_bytes(device)
    elif mem_mb:
        available = int(mem_mb) * MIB - resident_bytes()
    else:
        return None
    return max(available - buffer_bytes, 0)


def sliding_window_batch(requested: int, patch_bytes: int, budget_bytes: int | None) -> int:
    """Largest batch <= ``requested`` whose ``patch_bytes`` each fit ``budget_bytes``; at least 1.

    ``budget_bytes`` None means no bound (``requested`` is returned).
    """
    requested = max(int(requested), 1)
    if budget_bytes is None or patch_bytes <= 0:
        return requested
    return int(min(requested, max(budget_bytes // patch_bytes, 1)))


def choose_batch_size(predictor: Callable[[torch.Tensor], torch.Tensor], volume_shape: Sequence[int],
                      out_channels: int, *, requested: int, patch_size: int, probe_size: int,
                      mem_mb: int | None, device: torch.device) -> int:
    """The sliding-window batch for one volume ``(C, X, Y, Z)``: ``requested`` bounded by the memory left.

    See :func:`patch_activation_bytes` (per patch), :func:`sliding_window_buffer_bytes` and
    :func:`memory_budget_bytes`; logs the choice. ``probe_size`` must suit the network (a multiple of its
    down-sampling factor, at most ``patch_size``).
    """
    requested = max(int(requested), 1)
    if requested == 1:
        return 1
    buffers = sliding_window_buffer_bytes(volume_shape, out_channels, patch_size)
    budget = memory_budget_bytes(mem_mb, device, buffers)
    if budget is None:
        logger.info("sliding-window batch %d (--batch-size; no --mem to bound it)", requested)
        return requested
    per_patch = patch_activation_bytes(predictor, int(volume_shape[0]), patch_size, probe_size, device)
    batch = sliding_window_batch(requested, per_patch, budget)
    where = f"--mem {mem_mb} MB" if not is_cuda(device) else f"free memory of {device}"
    logger.info("sliding-window batch %d of --batch-size %d: %.0f MiB estimated per %d^3 patch, %.0f MiB left "
                "of the %s", batch, requested, per_patch / MIB, patch_size, budget / MIB, where)
    if budget < per_patch:
        logger.warning("even one %d^3 patch may not fit the %s (estimate %.0f MiB, %.0f MiB left); trying "
                       "batch 1, or use a smaller --patch-size", patch_size, where, per_patch / MIB, budget / MIB)
    return batch


def resident_bytes() -> int:
    """This process's resident memory in bytes (Linux ``/proc``; elsewhere its peak, which is larger)."""
    try:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        import resource
        import sys

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return int(peak if sys.platform == "darwin" else peak * 1024)  # macOS reports bytes, Linux KiB


# --------------------------------------------------------------------------- GPU out of memory
def predict_with_oom_fallback(run: Callable[[int, torch.device], Result], batch_size: int, device: torch.device,
                              cpu_batch_size: Callable[[], int] | int = 1) -> Result:
    """``run(batch_size, device)``, with two ways out of a CUDA out-of-memory error.

    On CUDA, a ``torch.cuda.OutOfMemoryError`` retries once with half the batch (at least 1); a second
    one runs ``run(cpu_batch_size, cpu)`` after one warning line. ``cpu_batch_size`` may be a callable,
    evaluated only then (the CPU batch depends on ``--mem``). On the CPU nothing is caught.
    """
    if not is_cuda(device):
        return run(batch_size, device)
    try:
        return run(batch_size, device)
    except torch.cuda.OutOfMemoryError:
        release_cached_memory(device)
    half = max(int(batch_size) // 2, 1)
    logger.info("%s ran out of memory at sliding-window batch %d; retrying with batch %d", device, batch_size, half)
    try:
        return run(half, device)
    except torch.cuda.OutOfMemoryError:
        release_cached_memory(device)
    cpu = torch.device("cpu")
    cpu_batch = cpu_batch_size() if callable(cpu_batch_size) else int(cpu_batch_size)
    logger.warning("%s ran out of memory again (batch %d): predicting this volume on the CPU (batch %d, slower)",
                   device, half, cpu_batch)
    return run(cpu_batch, cpu)


# --------------------------------------------------------------------------- whole-volume pass
#: Normalisation layers whose output depends on the spatial extent of the input (statistics over the
#: image itself): a whole-volume pass through them is not the same function as a patch-wise one.
EXTENT_DEPENDENT_NORMS = (torch.nn.InstanceNorm1d, torch.nn.InstanceNorm2d, torch.nn.InstanceNorm3d,
                          torch.nn.GroupNorm, torch.nn.LayerNorm)


def extent_dependent_layers(network: torch.nn.Module | None) -> list[str]:
    """Names of ``network``'s layers that normalise with statistics of the input itself (instance norm without
    running statistics, group/layer norm): their result changes with the input's extent, so a whole volume
    and a 64^3 patch of it are normalised differently."""
    if network is None:
        return []
    found = []
    for name, module in network.named_modules():
        if isinstance(module, EXTENT_DEPENDENT_NORMS):
            if getattr(module, "track_running_stats", False) and getattr(module, "running_mean", None) is not None:
                continue  # instance norm with running statistics behaves like batch norm in eval mode
            found.append(name or type(module).__name__)
    return found


def padded_shape(spatial: Sequence[int], multiple: int) -> tuple[int, int, int]:
    """Each side rounded up to a multiple of ``multiple`` (the network's down-sampling factor)."""
    multiple = max(int(multiple), 1)
    return tuple(-(-int(n) // multiple) * multiple for n in spatial)


def available_bytes(mem_mb: int | None, device: torch.device) -> int:
    """Memory the whole-volume pass may use: the GPU's free memory on CUDA; ``--mem`` minus this process's
    resident memory on the CPU, else the system's available memory (``MemAvailable``)."""
    if is_cuda(device):
        return free_memory_bytes(device)
    if mem_mb:
        return int(mem_mb) * MIB - resident_bytes()
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0  # unknown: do not risk it


def whole_volume_fits(predictor: Callable[[torch.Tensor], torch.Tensor], volume_shape: Sequence[int],
                      out_channels: int, *, multiple: int, probe_size: int, mem_mb: int | None,
                      device: torch.device) -> tuple[bool, int, int]:
    """Whether one forward pass over the zero-padded volume ``(C, X, Y, Z)`` fits the memory left.

    The estimate is :func:`patch_activation_bytes` scaled to the padded volume (an upper bound: it counts
    every activation as alive at once) plus the input and output copies. Returns ``(fits, estimate, available)``
    in bytes.
    """
    padded = padded_shape(volume_shape[1:], multiple)
    per_probe = patch_activation_bytes(predictor, int(volume_shape[0]), probe_size, probe_size, device)
    estimate = int(np.ceil(per_probe * np.prod(padded) / probe_size ** 3))
    estimate += FLOAT_BYTES * int(np.prod(padded)) * (int(volume_shape[0]) + 2 * int(out_channels))
    available = available_bytes(mem_mb, device)
    return estimate <= available, estimate, available


def predict_whole(predictor: Callable[[torch.Tensor], torch.Tensor], volume: np.ndarray, *, multiple: int = 1,
                  device: torch.device = torch.device("cpu"), mask: np.ndarray | None = None,
                  out_channels: int | None = None) -> np.ndarray:
    """One forward pass over the whole volume ``(C, X, Y, Z)``, zero-padded at the far end of each axis to a
    multiple of ``multiple`` (as the sliding window pads), cropped back: ``(C_out, X, Y, Z)`` float32, zero
    outside ``mask``. bf16 autocast and channels-last on CUDA, as :func:`predict_volume`."""
    volume = np.ascontiguousarray(volume, dtype=np.float32)
    spatial = volume.shape[1:]
    padding = [(0, 0)] + [(0, p - n) for n, p in zip(spatial, padded_shape(spatial, multiple))]
    inputs = torch.from_numpy(np.pad(volume, padding))[None].to(device)
    if is_cuda(device):
        inputs = inputs.contiguous(memory_format=torch.channels_last_3d)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if is_cuda(device) else nullcontext()
    with torch.inference_mode(), autocast:
        output = predictor(inputs).float()
    result = output[0, :, :spatial[0], :spatial[1], :spatial[2]].cpu().numpy()
    if out_channels is not None and result.shape[0] != out_channels:
        raise ValueError(f"the network returned {result.shape[0]} channels, expected {out_channels}")
    if mask is not None:
        result *= np.asarray(mask, dtype=bool)[None]
    return np.ascontiguousarray(result)


def predict_auto(predictor: Callable[[torch.Tensor], torch.Tensor], volume: np.ndarray, *, network=None,
                 multiple: int = 1, probe_size: int = 16, mem_mb: int | None = None, **sliding) -> np.ndarray:
    """A single whole-volume pass when it is the same function as the patch-wise one and fits in memory,
    else :func:`predict_volume` (sliding windows, ``**sliding`` its keyword arguments).

    The two agree up to the blending at patch borders for a fully convolutional network whose
    normalisation does not use the input's own statistics (see :func:`extent_dependent_layers`); a network
    with such layers (e.g. instance norm) always gets sliding windows, the extent it was trained on.
    """
    device = sliding.get("device", torch.device("cpu"))
    blocking = extent_dependent_layers(network)
    if blocking:
        logger.info("sliding windows: %d layer(s) normalise over the input's own extent (%s), so a whole-volume "
                    "pass would change the result", len(blocking), blocking[0])
        return predict_volume(predictor, volume, **sliding)
    out_channels = sliding.get("out_channels") or 1
    fits, estimate, available = whole_volume_fits(predictor, volume.shape, out_channels, multiple=multiple,
                                                  probe_size=probe_size, mem_mb=mem_mb, device=device)
    if not fits:
        logger.info("sliding windows: a whole-volume pass needs ~%.0f MiB, %.0f MiB available", estimate / MIB,
                    available / MIB)
        return predict_volume(predictor, volume, **sliding)
    logger.info("whole-volume pass: ~%.0f MiB estimated, %.0f MiB available", estimate / MIB, available / MIB)
    return predict_whole(predictor, volume, multiple=multiple, device=device, mask=sliding.get("mask"),
                         out_channels=sliding.get("out_channels"))
