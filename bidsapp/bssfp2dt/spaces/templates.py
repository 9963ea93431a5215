"""TemplateFlow templates for ``--output-spaces``, available offline.

Templates come through :func:`templateflow.api.get`. No network is used at run time: when
``TEMPLATEFLOW_HOME`` is not set, bssfp2dt points TemplateFlow at ``<work_dir>/templateflow`` and seeds it
with the templates that ship inside installed packages (:data:`OFFLINE_TEMPLATES`): nilearn carries the
ICBM 2009a nonlinear symmetric template (1 mm T1w and GM/WM probability maps), which TemplateFlow names
``MNI152NLin2009aSym``. Any other template works when the ``TEMPLATEFLOW_HOME`` given already holds it
(e.g. a home pre-fetched with ``python -c "from templateflow import api; api.get('MNI152NLin2009cAsym',
resolution=1, suffix='T1w')"``).
"""
from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

from bssfp2dt.errors import MissingInputError, UsageError

NATIVE_SPACE = "T1w"
#: Templates seeded from installed packages: name -> (package, file of the T1w, files of GM and WM).
OFFLINE_TEMPLATES = {
    "MNI152NLin2009aSym": ("nilearn", "datasets/data/mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
                           ("datasets/data/mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz",
                            "datasets/data/mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz")),
}
MNI_NOTICE = (
    "The ICBM 2009a nonlinear symmetric template files in this folder were copied from the nilearn package\n"
    "(nilearn/datasets/data/mni_icbm152_*_tal_nlin_sym_09a_converted.nii.gz) by bssfp2dt for offline use.\n\n"
    "Copyright (C) 1993-2009 Louis Collins, McConnell Brain Imaging Centre, Montreal Neurological Institute,\n"
    "McGill University. Permission to use, copy, modify, and distribute this software and its documentation\n"
    "for any purpose and without fee is hereby granted, provided that the above copyright notice appear in all\n"
    "copies. The authors and McGill University make no representations about the suitability of this software\n"
    "for any purpose. It is provided \"as is\" without express or implied warranty. The authors are not\n"
    "responsible for any data loss, equipment damage, property loss, or injury to subjects or patients\n"
    "resulting from the use or misuse of this software package.\n")
_NAME = re.compile(r"[A-Za-z][A-Za-z0-9]*")


def check_output_spaces(values) -> tuple[str, ...]:
    """``T1w`` first, then the templates in the given order, without repeats; bad names are exit 64.

    A template may carry the output voxel size as fMRIPrep writes it: ``MNI152NLin2009aSym:res-4`` (mm,
    default 2); one voxel size per template.
    """
    spaces, names = [NATIVE_SPACE], {NATIVE_SPACE}
    for value in values:
        name, resolution = parse_space(str(value))
        if name not in names:
            names.add(name)
            spaces.append(name if resolution is None else f"{name}:res-{resolution:g}")
    return tuple(spaces)


def parse_space(value: str) -> tuple[str, float | None]:
    """``"Name[:res-N]"`` -> ``(Name, N mm or None)``; exit 64 for anything else."""
    name, _, modifier = value.partition(":")
    match = re.fullmatch(r"res-([1-9][0-9]*)", modifier) if modifier else None
    if not _NAME.fullmatch(name) or (modifier and match is None):
        raise UsageError(f"--output-spaces {value!r} is not a TemplateFlow template name with an optional "
                         ":res-<mm> (letters and digits, e.g. MNI152NLin2009aSym or MNI152NLin2009aSym:res-2)")
    return name, float(match.group(1)) if match else None


def templateflow_home(work_dir: Path) -> Path:
    """The TemplateFlow home: ``$TEMPLATEFLOW_HOME`` if set, else ``<work_dir>/templateflow``."""
    return Path(os.environ.get("TEMPLATEFLOW_HOME") or Path(work_dir).resolve() / "templateflow")


def seed_offline(home: Path, name: str) -> bool:
    """Copy a template shipped inside an installed package into ``home`` when the home lacks it.

    Only empty or missing files are written (TemplateFlow's skeleton holds empty placeholders for files it
    has not downloaded), so a real, downloaded template is never replaced. Returns whether it seeded.
    """
    if name not in OFFLINE_TEMPLATES:
        return False
    package, t1w, (gm, wm) = OFFLINE_TEMPLATES[name]
    import importlib.util

    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return False
    root = Path(list(spec.submodule_search_locations)[0])
    folder = Path(home) / f"tpl-{name}"
    targets = {f"tpl-{name}_res-1_T1w.nii.gz": root / t1w, f"tpl-{name}_res-1_label-GM_probseg.nii.gz": root / gm,
               f"tpl-{name}_res-1_label-WM_probseg.nii.gz": root / wm}
    seeded = False
    for target, source in targets.items():
        path = folder / target
        if (not path.is_file() or path.stat().st_size == 0) and source.is_file():
            folder.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, path)
            seeded = True
    if seeded:
        (folder / "NOTICE-bssfp2dt.txt").write_text(MNI_NOTICE)
    return seeded


def template_file(name: str, work_dir: Path, suffix: str = "T1w", label: str | None = None) -> Path:
    """A 1 mm template file through :func:`templateflow.api.get` (seeded offline first); exit 66 if absent."""
    home = templateflow_home(work_dir)
    api = templateflow_api(home)
    seed_offline(home, name)
    try:
        found = api.get(name, resolution=1, suffix=suffix, label=label, desc=None, extension=".nii.gz")
    except Exception as error:  # noqa: BLE001 - templateflow raises many kinds (network, missing template)
        found, reason = None, f"{type(error).__name__}: {error}"
    else:
        reason = "not in the TemplateFlow home"
    if isinstance(found, list):
        found = found[0] if len(found) == 1 else None
    if not found or not Path(found).is_file() or Path(found).stat().st_size == 0:
        offline = ", ".join(OFFLINE_TEMPLATES)
        raise MissingInputError(f"template {name} ({suffix}) cannot be obtained offline from TemplateFlow home "
                                f"{home} ({reason}); use a template that works offline ({offline}) or set "
                                "TEMPLATEFLOW_HOME to a home that holds it")
    return Path(found)


def templateflow_api(home: Path):
    """``templateflow.api`` reading ``home``: templateflow fixes its home when first imported, so a module
    imported with another home is reloaded (its skeleton is copied from the package: no network)."""
    import importlib

    previous = os.environ.get("TEMPLATEFLOW_HOME")
    os.environ["TEMPLATEFLOW_HOME"] = str(home)  # read by templateflow.conf on (re)import only
    try:
        import templateflow.conf

        if Path(templateflow.conf.TF_HOME).resolve() != Path(home).resolve():
            importlib.reload(templateflow.conf)
            import templateflow.api

            importlib.reload(templateflow.api)
        import templateflow.api
    finally:  # the caller's environment is left as it was
        if previous is None:
            os.environ.pop("TEMPLATEFLOW_HOME", None)
        else:
            os.environ["TEMPLATEFLOW_HOME"] = previous
    return templateflow.api
