"""Property-based tests of the output naming and of the filter-file merging (hypothesis).

References: pybids' own file-name parser (``parse_file_entities`` with the BIDS, derivatives and BEP016
configs), the entity table of the BIDS schema (``bidsschematools``), and plain dict arithmetic for the
merge rule. The tensor-map properties live in ``test_dti_maps.py``.
"""
from __future__ import annotations

import copy
import json
import string
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bssfp2dt.config import (Config, PathSettings, ResourceSettings, RunSettings, SelectionSettings, load_toml,
                             merge_queries, save_toml)
from bssfp2dt.errors import UsageError
from bssfp2dt.io import derivatives as out
from bssfp2dt.io.bids import DEFAULT_QUERIES, to_pybids
from bssfp2dt.io.naming import ENTITY_ORDER, bids_filename, bids_path

PROPERTY_SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
ALNUM = string.ascii_letters + string.digits
PYBIDS_CONFIG = ["bids", "derivatives", out.PYBIDS_BEP016_CONFIG]
# Our entity key -> pybids' entity name (None: pybids has no pattern for it).
PYBIDS_NAME = {"stain": "staining", "processing": "proc", "mtransfer": "mt", "inversion": "inv",
               "hemisphere": "hemi", "resolution": "res", "density": "den", "description": "desc", "split": None}
INDEX_KEYS = ("run", "echo", "flip", "inversion", "split", "chunk")
ENUMS = {"mtransfer": ("on", "off"), "part": ("mag", "phase", "real", "imag"), "hemisphere": ("L", "R")}
PREFIX_TO_KEY = {prefix: key for key, prefix in ENTITY_ORDER}


def schema_entities() -> list[tuple[str, str]]:
    """(entity key, file-name prefix) in the order of the BIDS schema's entity table."""
    from bidsschematools import schema

    loaded = schema.load_schema()
    return [(key, loaded.objects.entities[key].name) for key in loaded.rules.entities]


# --------------------------------------------------------------------------- strategies
labels = st.text(ALNUM, min_size=1, max_size=8)
indices = st.text(string.digits, min_size=1, max_size=4)


def valid_value(key: str):
    if key in ENUMS:
        return st.sampled_from(ENUMS[key])
    return indices if key in INDEX_KEYS else labels


@st.composite
def entity_sets(draw) -> dict[str, str]:
    """A subject plus a random subset of the other entities, each with a valid value."""
    others = [key for key, _ in ENTITY_ORDER if key != "subject"]
    chosen = draw(st.lists(st.sampled_from(others), unique=True, max_size=len(others)))
    entities = {"subject": draw(labels)}
    for key in chosen:
        entities[key] = draw(valid_value(key))
    return entities


suffixes = labels
extensions = st.sampled_from([".nii.gz", ".nii", ".json", ".tsv", ".png"])
datatypes = st.sampled_from([None, "anat", "dwi", "func", "fmap"])
# Anything containing a character outside [A-Za-z0-9], or empty.
bad_labels = st.one_of(st.just(""), st.text(min_size=1, max_size=6).filter(
    lambda text: not (text.isascii() and text.isalnum())))


# --------------------------------------------------------------------------- naming
def test_entity_order_is_the_bids_schema_order():
    """ENTITY_ORDER (model/param aside) is a subsequence of the schema's table, with its prefixes."""
    reference = schema_entities()
    ours = [entry for entry in ENTITY_ORDER if entry[0] not in ("model", "param")]
    positions = [reference.index(entry) for entry in ours]  # ValueError if a key or prefix differs
    assert positions == sorted(positions)
    assert [key for key, _ in ENTITY_ORDER[-2:]] == ["model", "param"]


@PROPERTY_SETTINGS
@given(entities=entity_sets(), suffix=suffixes, extension=extensions, datatype=datatypes)
def test_every_name_parses_back_with_pybids(entities, suffix, extension, datatype):
    from bids.layout import parse_file_entities

    path = bids_path(Path("/ds"), datatype, suffix, extension, **entities)
    parsed = parse_file_entities(str(path), config=PYBIDS_CONFIG)
    expected = {PYBIDS_NAME.get(key, key): value for key, value in entities.items()
                if PYBIDS_NAME.get(key, key) is not None}
    expected.update(suffix=suffix, extension=extension)
    if datatype:
        expected["datatype"] = datatype
    assert {key: str(value) for key, value in parsed.items()} == expected


@PROPERTY_SETTINGS
@given(entities=entity_sets(), suffix=suffixes)
def test_entities_appear_in_table_order(entities, suffix):
    reference = [prefix for _, prefix in schema_entities()] + ["model", "param"]
    name = bids_filename(suffix, ".nii.gz", **entities)
    *pairs, last = name[: -len(".nii.gz")].split("_")
    assert last == suffix
    prefixes = [pair.split("-", 1)[0] for pair in pairs]
    assert prefixes[0] == "sub" and len(prefixes) == len(entities)
    assert [reference.index(p) for p in prefixes] == sorted(reference.index(p) for p in prefixes)
    assert {PREFIX_TO_KEY[p]: pair.split("-", 1)[1] for p, pair in zip(prefixes, pairs)} == entities


@PROPERTY_SETTINGS
@given(entities=entity_sets(), data=st.data())
def test_invalid_labels_are_rejected(entities, data):
    key = data.draw(st.sampled_from(sorted(entities)))
    bad = data.draw(bad_labels)
    with pytest.raises(ValueError):
        bids_filename("T1w", **{**entities, key: bad})


@pytest.mark.parametrize("bad", ["01\n", "a-b", "a_b", "a b", "\u00e91", ""])
def test_label_regressions(bad):
    """A trailing newline used to pass (``re.match`` with ``$``); separators and non-ASCII never may."""
    with pytest.raises(ValueError):
        bids_filename("T1w", subject=bad)
    with pytest.raises(ValueError):
        bids_filename("T1w", subject="01", acquisition=bad)


@PROPERTY_SETTINGS
@given(entities=entity_sets(), key=st.sampled_from(INDEX_KEYS), value=st.text(ALNUM, min_size=1, max_size=4))
def test_index_entities_take_digits_only(entities, key, value):
    call = lambda: bids_filename("dwi", **{**entities, key: value})  # noqa: E731
    if value.isdigit():
        assert f"_{dict(ENTITY_ORDER)[key]}-{value}_" in call()
    else:
        with pytest.raises(ValueError):
            call()


@pytest.mark.parametrize("key, value", [("mtransfer", "yes"), ("part", "magnitude"), ("hemisphere", "left")])
def test_entities_with_fixed_values_reject_others(key, value):
    with pytest.raises(ValueError):
        bids_filename("T1w", subject="01", **{key: value})


@PROPERTY_SETTINGS
@given(suffix=bad_labels)
def test_bad_suffixes_are_rejected(suffix):
    with pytest.raises(ValueError):
        bids_filename(suffix, subject="01")


@PROPERTY_SETTINGS
@given(subject=labels, session=st.one_of(st.none(), labels), modality=st.sampled_from(sorted(out.MODALITY_DESC)))
def test_every_output_name_parses_back(subject, session, modality):
    """All tensor-map, preproc and error-map names of a subject/session carry exactly their entities."""
    from bids.layout import parse_file_entities

    desc = out.MODALITY_DESC[modality]
    base = {"subject": subject, "space": "T1w", **({"session": session} if session else {})}
    paths = out.tensor_map_paths(subject, session, modality, "/out")
    expected = {
        "diffusivity": {"desc": desc, "model": "tensor", "param": "diffusivity", "suffix": "dwimap"},
        "colour_fa": {"desc": desc + "dec", "model": "tensor", "param": "fa", "suffix": "dwimap"},
        "gm": {"label": "GM", "suffix": "probseg"}, "wm": {"label": "WM", "suffix": "probseg"},
        "csf": {"label": "CSF", "suffix": "probseg"}, "brain_mask": {"desc": "brain", "suffix": "mask"},
        **{param: {"desc": desc, "model": "tensor", "param": param, "suffix": "dwimap"} for param in out.SCALAR_UNITS},
    }
    for name, entities in expected.items():
        path = getattr(paths, name)
        parsed = {k: str(v) for k, v in parse_file_entities(str(path), config=PYBIDS_CONFIG).items()}
        datatype = "dwi" if entities["suffix"] == "dwimap" else "anat"
        assert parsed == {**base, **entities, "datatype": datatype, "extension": ".nii.gz"}, name
        assert path.parent == Path("/out", f"sub-{subject}", *([f"ses-{session}"] if session else []), datatype)
    error_map = out.error_map_path("/out", subject, session, modality, "fa", reference_session=session)
    parsed = parse_file_entities(str(error_map), config=PYBIDS_CONFIG)
    assert parsed["desc"] == out.evaluation_desc(modality, session) and parsed["param"] == "fa"
    preproc = out.preproc_paths(subject, session, "/out")
    parsed = parse_file_entities(str(preproc.bssfp_phase), config=PYBIDS_CONFIG)
    assert (parsed["acquisition"], parsed["part"], parsed["desc"]) == ("pcbssfp", "phase", "preproc")


@PROPERTY_SETTINGS
@given(subject=bad_labels)
def test_output_names_refuse_bad_subject_labels(subject):
    with pytest.raises(ValueError):
        out.tensor_map_paths(subject, None, "pc-bssfp", "/out")


# --------------------------------------------------------------------------- filter-file merging
entity_names = st.text(string.ascii_lowercase, min_size=1, max_size=10).filter(
    lambda name: name not in ("subject", "session"))
json_text = st.text(max_size=12)
scalar_values = st.one_of(st.none(), st.just("*"), json_text, st.integers(-10 ** 6, 10 ** 6))
query_values = st.one_of(scalar_values, st.lists(st.one_of(json_text, st.integers(0, 99)), max_size=4))
overrides_strategy = st.dictionaries(st.sampled_from(sorted(DEFAULT_QUERIES)),
                                     st.dictionaries(entity_names, query_values, max_size=4), max_size=4)


@PROPERTY_SETTINGS
@given(overrides=overrides_strategy)
def test_merge_follows_the_rule_and_never_touches_the_defaults(overrides):
    snapshot = copy.deepcopy(DEFAULT_QUERIES)
    overrides_snapshot = copy.deepcopy(overrides)
    merged = merge_queries(DEFAULT_QUERIES, overrides, None)
    assert DEFAULT_QUERIES == snapshot and overrides == overrides_snapshot
    assert merged == {kind: {**query, **overrides.get(kind, {})} for kind, query in snapshot.items()}
    # The result must not alias the defaults' (or the user's) lists: editing it changes neither.
    for query in merged.values():
        for value in query.values():
            if isinstance(value, list):
                value.append("edited")
    assert DEFAULT_QUERIES == snapshot and overrides == overrides_snapshot


@PROPERTY_SETTINGS
@given(overrides=overrides_strategy)
def test_null_and_star_become_pybids_none_and_any(overrides):
    from bids.layout import Query

    merged = merge_queries(DEFAULT_QUERIES, overrides, None)
    for kind, query in merged.items():
        translated = to_pybids(query)
        assert set(translated) == set(query)
        for entity, value in query.items():
            if value is None:
                assert translated[entity] is Query.NONE
            elif value == "*":
                assert translated[entity] is Query.ANY
            else:
                assert translated[entity] == value


@PROPERTY_SETTINGS
@given(overrides=overrides_strategy)
def test_merged_queries_round_trip_through_the_config_toml(overrides):
    merged = merge_queries(DEFAULT_QUERIES, overrides, None)
    config = Config(paths=PathSettings(bids_dir=Path("/d/bids"), output_dir=Path("/d/out"), work_dir=Path("/w")),
                    selection=SelectionSettings(analysis_level="participant",
                                                bids_queries=json.dumps(merged, sort_keys=True)),
                    resources=ResourceSettings(nprocs=1, omp_nthreads=1), run=RunSettings(run_uuid="u"))
    with tempfile.TemporaryDirectory() as folder:
        loaded = load_toml(save_toml(config, Path(folder) / "c.toml"))
    assert loaded == config
    assert loaded.selection.queries == merged  # None and "*" come back as themselves


@PROPERTY_SETTINGS
@given(overrides=overrides_strategy)
def test_filter_file_through_the_cli_resolution(overrides):
    """Writing the overrides as a filter file and resolving the arguments gives the same merge."""
    from bssfp2dt.cli.parser import parse_args
    from bssfp2dt.config import config_from_args

    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        (root / "bids").mkdir()
        (root / "bids" / "dataset_description.json").write_text('{"Name": "x", "BIDSVersion": "1.10.0"}')
        (root / "filter.json").write_text(json.dumps(overrides))
        args = parse_args([str(root / "bids"), str(root / "out"), "participant", "-w", str(root / "work"),
                           "--bids-filter-file", str(root / "filter.json")])
        config = config_from_args(args, "u", DEFAULT_QUERIES)
        assert not (root / "out").exists() and not (root / "work").exists()
    assert config.selection.queries == merge_queries(DEFAULT_QUERIES, overrides, None)


bad_values = st.one_of(st.floats(allow_nan=False), st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
                       st.lists(st.one_of(st.floats(allow_nan=False), st.none(), st.lists(st.integers(), max_size=2)),
                                min_size=1, max_size=3).filter(
                           lambda items: any(not isinstance(i, (str, int)) for i in items)))


@PROPERTY_SETTINGS
@given(overrides=overrides_strategy, kind=st.sampled_from(sorted(DEFAULT_QUERIES)), entity=entity_names,
       value=bad_values)
def test_bad_values_are_usage_errors_and_leave_the_defaults(overrides, kind, entity, value):
    snapshot = copy.deepcopy(DEFAULT_QUERIES)
    broken = {**overrides, kind: {**overrides.get(kind, {}), entity: value}}
    with pytest.raises(UsageError) as caught:
        merge_queries(DEFAULT_QUERIES, broken, Path("/f.json"))
    assert "/f.json" in caught.value.message and "\n" not in caught.value.message
    assert DEFAULT_QUERIES == snapshot
