"""The model contract lives in one place: every table of modality facts is read from bssfp2dt.modalities."""
import dataclasses
import re
from pathlib import Path

import pytest

from bssfp2dt import modalities

PACKAGE = Path(modalities.__file__).parent


def test_records_are_frozen_and_unique():
    assert [m.name for m in modalities.MODALITIES] == list(modalities.NAMES)
    assert len(set(modalities.NAMES)) == len(modalities.NAMES)
    assert len({m.desc for m in modalities.MODALITIES}) == len(modalities.MODALITIES)
    assert all(m.desc.isalnum() for m in modalities.MODALITIES)  # a BIDS label
    with pytest.raises(dataclasses.FrozenInstanceError):
        modalities.PC_BSSFP.channels = 12  # type: ignore[misc]
    assert modalities.get("pcbssfp") is modalities.get(modalities.PC_BSSFP.name) is modalities.PC_BSSFP
    with pytest.raises(ValueError, match="unknown input modality"):
        modalities.get("flair")


def test_every_table_reads_the_records():
    from bssfp2dt.cli.parser import INPUT_MODALITIES, LR_SCHEDULES, MODEL_SIZES, build_parser
    from bssfp2dt.config import SelectionSettings
    from bssfp2dt.evaluation.reference_results import THESIS_MODALITIES
    from bssfp2dt.io.derivatives import MODALITY_DESC, TENSOR_COMPONENT_ORDER
    from bssfp2dt.models.generator import GENERATOR_SIZES, MODALITY_CHANNELS, TENSOR_CHANNELS
    from bssfp2dt.pipeline.group import MODALITY_ORDER
    from bssfp2dt.preprocessing.normalization import GROUPS
    from bssfp2dt.training import module
    from bssfp2dt.training.stages import STAGES

    assert INPUT_MODALITIES == modalities.NAMES
    assert MODALITY_CHANNELS == {m.name: m.channels for m in modalities.MODALITIES}
    assert MODALITY_DESC == {m.name: m.desc for m in modalities.MODALITIES}
    assert set(MODALITY_ORDER) == {m.desc for m in modalities.MODALITIES}
    assert set(THESIS_MODALITIES.values()) == {m.desc for m in modalities.MODALITIES}
    assert TENSOR_COMPONENT_ORDER == modalities.TENSOR_COMPONENTS and TENSOR_CHANNELS == 6
    assert set(GENERATOR_SIZES) == set(modalities.MODEL_SIZES) and MODEL_SIZES == modalities.MODEL_SIZES
    assert module.LR_SCHEDULES == modalities.LR_SCHEDULES == LR_SCHEDULES
    assert STAGES["autoencoder"].input_modality == modalities.AUTOENCODER.name
    assert SelectionSettings("participant").input_modality == modalities.DEFAULT.name
    assert build_parser().parse_args(["b", "o", "participant"]).input_modality == modalities.DEFAULT.name
    for modality in modalities.MODALITIES:
        assert set(modality.groups) | set(modalities.TENSOR_GROUPS) <= set(GROUPS)


def test_sources_are_preprocessed_images():
    from bssfp2dt.preprocessing.sessions import PreprocessedSession

    fields = {item.name for item in dataclasses.fields(PreprocessedSession)}
    assert {m.source for m in modalities.MODALITIES} <= fields


def test_no_other_module_spells_a_modality_name():
    """A modality name in quotes outside modalities.py means a table or an if-chain that a new modality
    would have to find (the acceptance allows two files: modalities.py and one more)."""
    pattern = re.compile("|".join(re.escape(f'"{name}"') for name in ("pc-bssfp", "dwi-tensor")))
    spelled = sorted(path.relative_to(PACKAGE).as_posix() for path in PACKAGE.rglob("*.py")
                     if pattern.search(path.read_text()))
    assert spelled == ["modalities.py"]


def test_modalities_imports_only_the_standard_library():
    import ast

    tree = ast.parse(Path(modalities.__file__).read_text())
    imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                for alias in node.names}
    imported |= {node.module.split(".")[0] for node in ast.walk(tree)
                 if isinstance(node, ast.ImportFrom) and node.module}
    assert imported <= {"__future__", "dataclasses"}
