"""The methods boilerplate ``logs/CITATION.md`` and its references ``logs/CITATION.bib`` (as fMRIPrep writes).

Built from the run records (``report_context.json``) of the subjects, so the text names only the steps
that actually ran (a step recorded as ``skipped: ...`` is reported as not run) and the model that
predicted the maps. Tools are recognised in the step records by name; each brings its reference.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

CITATION_MD = "CITATION.md"
CITATION_BIB = "CITATION.bib"

#: key -> BibTeX entry of every reference the text may cite.
REFERENCES = {
    "nipype": ("@article{nipype, author={Gorgolewski, K. and others}, title={Nipype: a flexible, lightweight and "
               "extensible neuroimaging data processing framework in Python}, journal={Frontiers in Neuroinformatics},"
               " volume={5}, pages={13}, year={2011}, doi={10.3389/fninf.2011.00013}}"),
    "dipy": ("@article{dipy, author={Garyfallidis, E. and others}, title={Dipy, a library for the analysis of "
             "diffusion MRI data}, journal={Frontiers in Neuroinformatics}, volume={8}, pages={8}, year={2014}, "
             "doi={10.3389/fninf.2014.00008}}"),
    "nibabel": ("@software{nibabel, author={Brett, M. and others}, title={nibabel}, publisher={Zenodo}, "
                "doi={10.5281/zenodo.591597}}"),
    "pytorch": ("@inproceedings{pytorch, author={Paszke, A. and others}, title={PyTorch: an imperative style, "
                "high-performance deep learning library}, booktitle={Advances in Neural Information Processing "
                "Systems 32}, pages={8024--8035}, year={2019}}"),
    "ants": ("@article{ants, author={Avants, B. B. and Epstein, C. L. and Grossman, M. and Gee, J. C.}, "
             "title={Symmetric diffeomorphic image registration with cross-correlation}, journal={Medical Image "
             "Analysis}, volume={12}, number={1}, pages={26--41}, year={2008}, doi={10.1016/j.media.2007.06.004}}"),
    "mrtrix": ("@article{mrtrix, author={Tournier, J.-D. and others}, title={MRtrix3: a fast, flexible and open "
               "software framework for medical image processing and visualisation}, journal={NeuroImage}, "
               "volume={202}, pages={116137}, year={2019}, doi={10.1016/j.neuroimage.2019.116137}}"),
    "gibbs": ("@article{gibbs, author={Kellner, E. and Dhital, B. and Kiselev, V. G. and Reisert, M.}, "
              "title={Gibbs-ringing artifact removal based on local subvoxel-shifts}, journal={Magnetic Resonance "
              "in Medicine}, volume={76}, number={5}, pages={1574--1581}, year={2016}, doi={10.1002/mrm.26054}}"),
    "hmrf": ("@article{hmrf, author={Zhang, Y. and Brady, M. and Smith, S.}, title={Segmentation of brain MR images "
             "through a hidden Markov random field model and the expectation-maximization algorithm}, "
             "journal={IEEE Transactions on Medical Imaging}, volume={20}, number={1}, pages={45--57}, year={2001}, "
             "doi={10.1109/42.906424}}"),
    "mi": ("@article{mi, author={Mattes, D. and Haynor, D. R. and Vesselle, H. and Lewellen, T. K. and Eubank, W.}, "
           "title={PET-CT image registration in the chest using free-form deformations}, journal={IEEE "
           "Transactions on Medical Imaging}, volume={22}, number={1}, pages={120--128}, year={2003}, "
           "doi={10.1109/TMI.2003.809072}}"),
    "topup": ("@article{topup, author={Andersson, J. L. R. and Skare, S. and Ashburner, J.}, title={How to correct "
              "susceptibility distortions in spin-echo echo-planar images: application to diffusion tensor "
              "imaging}, journal={NeuroImage}, volume={20}, number={2}, pages={870--888}, year={2003}, "
              "doi={10.1016/S1053-8119(03)00336-7}}"),
    "eddy": ("@article{eddy, author={Andersson, J. L. R. and Sotiropoulos, S. N.}, title={An integrated approach "
             "to correction for off-resonance effects and subject movement in diffusion MR imaging}, "
             "journal={NeuroImage}, volume={125}, pages={1063--1078}, year={2016}, "
             "doi={10.1016/j.neuroimage.2015.10.019}}"),
    "templateflow": ("@article{templateflow, author={Ciric, R. and others}, title={TemplateFlow: FAIR-sharing of "
                     "multi-scale, multi-species brain models}, journal={Nature Methods}, volume={19}, "
                     "pages={1568--1571}, year={2022}, doi={10.1038/s41592-022-01681-2}}"),
    "mni2009": ("@article{mni2009, author={Fonov, V. S. and Evans, A. C. and McKinstry, R. C. and Almli, C. R. and "
                "Collins, D. L.}, title={Unbiased nonlinear average age-appropriate brain templates from birth to "
                "adulthood}, journal={NeuroImage}, volume={47}, pages={S102}, year={2009}, "
                "doi={10.1016/S1053-8119(09)70884-5}}"),
    "bep016": ("@misc{bep016, title={BIDS Extension Proposal 16 (BEP016): diffusion derivatives}, "
               "howpublished={\\url{https://bids.neuroimaging.io/bep016}}}"),
}


def _ran(value: Any) -> bool:
    """Whether a provenance value says the step ran (``skipped: ...``/``none`` mean it did not)."""
    text = json.dumps(value).lower() if not isinstance(value, str) else value.lower()
    return not (text.startswith("skipped") or text in ("none", "null", '"none"'))


def _steps(contexts: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    return [step for context in contexts for session in context.get("sessions", [])
            for step in session.get("steps", [])]


def _first(steps: Iterable[Mapping[str, Any]], name_part: str) -> Mapping[str, Any] | None:
    return next((step for step in steps if name_part in str(step.get("step", ""))), None)


def methods_text(contexts: Sequence[Mapping[str, Any]]) -> tuple[str, list[str]]:
    """The boilerplate (Markdown) and the keys of the references it cites, from the subjects' run records."""
    from bssfp2dt import __version__

    steps = _steps(contexts)
    cited = ["nipype", "nibabel"]
    version = next((context.get("version") for context in contexts if context.get("version")), __version__)
    n_subjects = len(contexts)
    paragraphs = [f"Results included in this manuscript come from processing with *bssfp2dt* {version}, a BIDS App "
                  "that predicts the diffusion tensor from balanced steady-state free precession (bSSFP) or "
                  "T1-weighted (T1w) images, built on Nipype [@nipype] and NiBabel [@nibabel] "
                  f"({n_subjects} subject(s)).",
                  _anatomical(steps, cited), _bssfp(steps, cited), _dwi(steps, cited), _model(contexts, cited),
                  _spaces(contexts, steps, cited)]
    text = "\n\n".join(paragraph for paragraph in paragraphs if paragraph)
    return text, list(dict.fromkeys(cited))


def _anatomical(steps, cited) -> str:
    grid = _first(steps, "t1w_to_grid")
    tissues = _first(steps, "tissue")
    parts = ["**Anatomical data.** The T1w image was brain-masked"]
    if grid:
        parts.append(f" and resampled to a {grid.get('voxel_mm', 2)} mm isotropic grid in T1w space (the common "
                     "grid of all outputs)")
    text = "".join(parts) + "."
    if tissues:
        method = str(tissues.get("method", "tissue classification"))
        if "hmrf" in method.lower():
            cited += ["hmrf", "dipy"]
            text += f" Grey-matter, white-matter and CSF probability maps were estimated with {method} [@hmrf; @dipy]."
        else:
            text += f" Grey-matter, white-matter and CSF probability maps: {method}."
    return text


def _registration_phrase(step: Mapping[str, Any], cited: list[str]) -> str:
    """Which tool registered the image (from the step record's method/metric fields)."""
    described = " ".join(str(step.get(key, "")) for key in ("method", "tool", "metric", "library")).lower()
    if "ants" in described:
        cited.append("ants")
        return "rigidly registered to the T1w with ANTs [@ants]"
    cited += ["dipy", "mi"]
    return "rigidly registered to the T1w (mutual information [@mi], DIPY [@dipy])"


def _gibbs_phrase(value: Any, cited: list[str]) -> str | None:
    if value is None or not _ran(value):
        return None
    text = str(value).lower()
    cited.append("gibbs")
    if "mrdegibbs" in text or "mrtrix" in text:
        cited.append("mrtrix")
        return "Gibbs ringing was removed with MRtrix3's mrdegibbs [@gibbs; @mrtrix]"
    cited.append("dipy")
    return "Gibbs ringing was removed by local sub-voxel shifts (DIPY) [@gibbs; @dipy]"


def _bssfp(steps, cited) -> str:
    prepare, register = _first(steps, "prepare_bssfp"), _first(steps, "register_bssfp")
    if not prepare and not register:
        return ""
    sentences = ["**bSSFP data.** The phase-cycled bSSFP magnitude and phase were combined into complex images"]
    gibbs = _gibbs_phrase(prepare.get("gibbs") if prepare else None, cited)
    if gibbs:
        sentences.append(f"; {gibbs[0].lower()}{gibbs[1:]}")
    else:
        sentences.append("; Gibbs-ringing removal was not run")
    if register:
        sentences.append(f". Their mean magnitude was {_registration_phrase(register, cited)}, and the complex "
                         "images were resampled to the common grid by trilinear interpolation of their real and "
                         "imaginary parts")
    return "".join(sentences) + "."


def _dwi(steps, cited) -> str:
    prepare, register = _first(steps, "preprocess_dwi"), _first(steps, "register_dwi")
    if not prepare:
        return ""
    sentences = ["**Diffusion data (reference for the evaluation).**"]
    topup = prepare.get("topup_eddy")
    if topup is not None and _ran(topup):
        cited += ["topup", "eddy"]
        how = topup.get("readout_time", "") if isinstance(topup, dict) else str(topup)
        sentences.append(" Susceptibility distortions (with the reverse phase-encoded b0), eddy currents and head "
                         f"motion were corrected with FSL's topup and eddy through fslpy [@topup; @eddy] "
                         f"(readout time {how}).")
    else:
        sentences.append(f" FSL's topup and eddy were not run ({topup or 'not recorded'}).")
    gibbs = _gibbs_phrase(prepare.get("gibbs"), cited)
    sentences.append(f" {gibbs}." if gibbs else " Gibbs-ringing removal was not run.")
    denoise = prepare.get("denoise")
    if denoise is not None and _ran(denoise):
        if "mrtrix" in str(denoise).lower() or "dwidenoise" in str(denoise).lower():
            cited.append("mrtrix")
        sentences.append(f" Denoising: {denoise}.")
    motion = prepare.get("motion_correction")
    if motion == "done by eddy":
        pass
    elif motion is not None and _ran(motion):
        cited.append("dipy")
        sentences.append(" Head motion was corrected by rigid registration of every volume to the mean b0, with "
                         "the b-vectors rotated accordingly (DIPY [@dipy]).")
    else:
        sentences.append(" Head-motion correction was not run.")
    sentences.append(" The diffusion tensor was fitted by weighted least squares (DIPY)")
    cited.append("dipy")
    if register:
        sentences.append(f"; the mean b0 was {_registration_phrase(register, cited)} and the tensor was resampled to "
                         "the common grid with finite-strain reorientation")
    return "".join(sentences) + "."


def _model(contexts, cited) -> str:
    models = {}
    for context in contexts:
        model = context.get("model") or {}
        if model.get("id"):
            models[model["id"]] = model
    if not models:
        return ""
    cited += ["pytorch", "bep016"]
    described = "; ".join(f"model `{model['id']}` (version {model.get('version')}, sha256 {model.get('sha256')}, "
                          f"input {model.get('modality')}, {model.get('size')} generator)" for model in models.values())
    return ("**Tensor prediction.** The six tensor components were predicted on the common grid by a 3-D generator "
            f"network (PyTorch [@pytorch]) with sliding-window inference: {described}. Fractional anisotropy, mean, "
            "axial and radial diffusivity and colour-FA were computed from the eigenvalues of the predicted tensor, "
            "and written with BEP016 draft naming [@bep016].")


def _spaces(contexts, steps, cited) -> str:
    normalise = _first(steps, "normalise_to_template")
    if not normalise:
        return ""
    cited += ["ants", "templateflow"]
    template = str(normalise.get("template", ""))
    if "MNI152" in template:
        cited.append("mni2009")
    return (f"**Template space.** The T1w was normalised to {template} (TemplateFlow [@templateflow]) at "
            f"{normalise.get('voxel_mm', 2):g} mm with ANTs [@ants] ({normalise.get('transform_type', 'affine')} "
            f"registration: {normalise.get('stages', 'affine')}); the predicted tensor was resampled "
            "(trilinear interpolation of the components) with reorientation of every tensor by the rotation of the "
            "transform's Jacobian (finite strain), and FA, MD, AD, RD and colour-FA were recomputed from it.")


def write_citation_files(output_dir: Path | str, contexts: Sequence[Mapping[str, Any]]) -> Path:
    """Write ``logs/CITATION.md`` and ``logs/CITATION.bib``; returns the Markdown path."""
    from bssfp2dt.io.atomic import write_text

    text, cited = methods_text(contexts)
    logs = Path(output_dir) / "logs"
    bib = "\n\n".join(REFERENCES[key] for key in cited) + "\n"
    references = "\n".join(f"- [@{key}] " + REFERENCES[key].split("title={", 1)[1].split("}", 1)[0] for key in cited)
    write_text(bib, logs / CITATION_BIB)
    return write_text(f"# Methods (bssfp2dt boilerplate)\n\nThe text below may be copied into a manuscript; it names "
                      f"the steps that ran for these data. References: `{CITATION_BIB}` next to this file.\n\n"
                      f"{text}\n\n## References\n\n{references}\n", logs / CITATION_MD)
