"""The model's input contract: one record per input modality, the only place a modality name is spelled.

Every module that needs to know what a modality implies (how many channels the network reads, which raw
inputs it comes from, which preprocessed image feeds it, which normalisation groups scale it, the ``desc``
label of its outputs) reads it here. Adding a modality means adding a record here, then the code that builds
its channels (:mod:`bssfp2dt.preprocessing.network_input`) if its ``source`` is new.

Standard library only (the command line's ``--help`` imports it and stays instant).
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Modality:
    """One input modality of the network.

    ``name``: the ``--input-modality`` value (also the checkpoint's ``modality`` and the generator's head);
    ``desc``: the alphanumeric BIDS ``desc`` label of the outputs predicted from it;
    ``channels``: the network input channels C of (B, C, X, Y, Z);
    ``raw_inputs``: the raw BIDS inputs read for it besides the T1w: ``"bssfp"`` (magnitude + phase series)
    and/or ``"dwi"`` (series, .bval, .bvec);
    ``source``: the :class:`~bssfp2dt.preprocessing.sessions.PreprocessedSession` image that feeds it:
    ``"bssfp"`` (X, Y, Z, 24 interleaved), ``"t1w"`` (X, Y, Z) or ``"tensor"`` (X, Y, Z, 6);
    ``groups``: the normalisation groups that scale its channels (the checkpoint must carry them);
    ``single_cycle``: bSSFP only: the first phase cycle repeated (a single-cycle acquisition);
    ``label``: how the reports and the thesis name it.
    """

    name: str
    desc: str
    channels: int
    raw_inputs: tuple[str, ...]
    source: str
    groups: tuple[str, ...]
    single_cycle: bool = False
    label: str = ""

    @property
    def reads_bssfp(self) -> bool:
        """Whether the network input comes from the phase-cycled bSSFP series."""
        return "bssfp" in self.raw_inputs

    @property
    def phase_cycled(self) -> bool:
        """Whether the input holds distinct phase cycles (pc-bSSFP; not the single cycle repeated)."""
        return self.reads_bssfp and not self.single_cycle

    @property
    def needs_dwi(self) -> bool:
        """Whether the network input is computed from the DWI (so a subject without DWI has no input)."""
        return "dwi" in self.raw_inputs


PC_BSSFP = Modality("pc-bssfp", "pcbssfp", 24, ("bssfp",), "bssfp", ("magnitude", "phase"), label="pc-bSSFP")
BSSFP = Modality("bssfp", "bssfp", 24, ("bssfp",), "bssfp", ("magnitude", "phase"), single_cycle=True,
                 label="bSSFP")
T1W = Modality("t1w", "t1w", 6, (), "t1w", ("t1w",), label="T1w")
DWI_TENSOR = Modality("dwi-tensor", "dwi", 6, ("dwi",), "tensor", (), label="DT")

MODALITIES: tuple[Modality, ...] = (PC_BSSFP, BSSFP, T1W, DWI_TENSOR)
BY_NAME: dict[str, Modality] = {modality.name: modality for modality in MODALITIES}
BY_DESC: dict[str, Modality] = {modality.desc: modality for modality in MODALITIES}
NAMES: tuple[str, ...] = tuple(BY_NAME)
DEFAULT = PC_BSSFP  # --input-modality default: the packaged model's input
#: The order of the group tables and figures (and of the thesis' tables): the DWI-fed reference first.
REPORT_ORDER: tuple[Modality, ...] = (DWI_TENSOR, PC_BSSFP, BSSFP, T1W)
#: The autoencoder stage reproduces the DWI tensor from itself.
AUTOENCODER = DWI_TENSOR

#: The diffusion tensor's components, in the order of the network output channels and the BEP016 volumes.
TENSOR_COMPONENTS: tuple[str, ...] = ("D11", "D12", "D13", "D22", "D23", "D33")
TENSOR_CHANNELS = len(TENSOR_COMPONENTS)
#: Normalisation groups of the target tensor (every checkpoint carries them).
TENSOR_GROUPS: tuple[str, ...] = ("tensor_diagonal", "tensor_offdiagonal")

#: Generator sizes (``--model-size``; :data:`bssfp2dt.models.generator.GENERATOR_SIZES` defines them).
MODEL_SIZES: tuple[str, ...] = ("tiny", "small", "reference")
#: The size a run trains from scratch without ``--model-size``: the published network.
DEFAULT_MODEL_SIZE = "reference"
#: Learning-rate schedules (``--lr-schedule``; :mod:`bssfp2dt.training.module` implements them).
LR_SCHEDULES: tuple[str, ...] = ("constant", "cosine")


def get(name: str) -> Modality:
    """The record of an ``--input-modality`` value or a ``desc`` label; ValueError for an unknown one."""
    found = BY_NAME.get(name) or BY_DESC.get(name)
    if found is None:
        raise ValueError(f"unknown input modality {name!r}; choose one of {', '.join(NAMES)}")
    return found
