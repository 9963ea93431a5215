"""Preprocessing steps, new path against the old one, in the same run, on one full-size simulated subject.

Simulates (unless ``--bids-dir`` is given) ``bssfp2dt-simulate OUT --subjects 1 --bssfp-sessions 1
--dwi-sessions 1`` (MNI anatomy, 1 mm T1w, 1.4 mm pc-bSSFP, 2 mm DWI). Every step runs in its own fresh
Python process, which reports its CPU time (its own plus its children's: ``mrdegibbs`` and the motion
correction's workers) and its peak resident memory:

| step | old | new |
|---|---|---|
| bSSFP -> T1w and b0 -> T1w rigid registration | dipy MI on the native T1w | ANTs (antspyx) on the 2 mm T1w |
| Gibbs removal, bSSFP real/imaginary volumes and DWI volumes | dipy ``gibbs_removal`` | MRtrix3 ``mrdegibbs`` |
| DWI head-motion correction | dipy, serial | ANTs, ``--nprocs`` workers |

``--reduced N`` (the default, 4) times the slow old Gibbs and motion-correction steps on N volumes only
and the new ones on the same N (ratios per volume are what is compared); ``--reduced 0`` runs them on all.
``--workflow`` also profiles the whole default preprocessing chain of the subject (what ``participant`` runs
with default settings: the workflow's steps one after the other in one fresh process, the DWI step split into
its parts), CPU and wall time per step, and checks it against the simulator's truth: the rigid registrations
against the recorded head poses, the per-volume motion estimates against identity (the simulator moves the
head between scans, not within one) and the tensor on the common grid against the noiseless fit in white
matter. ``--workflow-only`` skips the old/new comparison.

Run: ``.venv/bin/python benchmarks/bench_preprocessing.py [--work /tmp/bench_preproc] [--nprocs 2] [--workflow]``
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

STEPS = ("register_bssfp", "register_dwi", "gibbs_bssfp", "gibbs_dwi", "motion")


def machine_description() -> str:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (f"{platform.machine()} {platform.processor() or ''} {cores} cores available, load average {load:.1f}, "
            f"Python {sys.version.split()[0]}")


# --------------------------------------------------------------------------- one step (child process)
def _inputs(bids_dir: Path) -> dict:
    subject = bids_dir / "sub-01"
    found = {"t1w": sorted(subject.rglob("*_T1w.nii.gz"))[0], "dwi": sorted(subject.rglob("*_dwi.nii.gz"))[0]}
    found["magnitude"] = next(p for p in sorted(subject.rglob("*.nii.gz")) if "part-mag" in p.name)
    found["phase"] = Path(str(found["magnitude"]).replace("part-mag", "part-phase"))
    return found


def _bssfp_signal(files: dict):
    import numpy as np

    from bssfp2dt.io.nifti import load_nifti
    from bssfp2dt.preprocessing import bssfp

    magnitude, affine = load_nifti(files["magnitude"])
    phase, _ = load_nifti(files["phase"])
    units = json.loads(Path(str(files["phase"]).replace(".nii.gz", ".json")).read_text()).get("Units", "arbitrary")
    signal = bssfp.to_complex(magnitude, bssfp.rescale_phase(phase, units))
    return signal * np.exp(-1j * bssfp.global_phases(signal)), affine


def _dwi(files: dict):
    from bssfp2dt.io.nifti import load_nifti
    from bssfp2dt.preprocessing import dwi

    data, affine = load_nifti(files["dwi"])
    stem = str(files["dwi"]).replace(".nii.gz", "")
    bvals, bvecs = dwi.read_bvals_bvecs(stem + ".bval", stem + ".bvec")
    return data, affine, bvals, bvecs


def run_step(step: str, path: str, bids_dir: Path, reduced: int, nprocs: int) -> dict:
    """Run one step (``path`` "old" or "new") on the subject; returns what it measured besides time."""
    import numpy as np

    from bssfp2dt.io.nifti import load_nifti
    from bssfp2dt.preprocessing import dwi as dwi_steps
    from bssfp2dt.preprocessing import steps, registration

    files = _inputs(bids_dir)
    backend = "dipy" if path == "old" else "ants"
    method = "dipy" if path == "old" else "mrdegibbs"
    if step.startswith("register"):
        t1w, t1w_affine = load_nifti(files["t1w"])
        if step == "register_bssfp":
            signal, affine = _bssfp_signal(files)
            moving = np.abs(signal).mean(axis=-1)
        else:
            data, affine, bvals, _ = _dwi(files)
            moving = dwi_steps.mean_b0(data, bvals)
        static, static_affine = np.asarray(t1w, dtype=np.float64), t1w_affine
        if backend == "ants":
            static, static_affine = steps.registration_image(static, static_affine, 2.0)
        started = time.process_time()
        transform = registration.register(static, static_affine, moving, affine, "rigid",
                                          settings=steps.registration_settings(backend), initial=np.eye(4))
        return {"step_cpu_self": time.process_time() - started, "transform": transform.tolist(), "volumes": 1}
    if step == "gibbs_bssfp":
        from bssfp2dt.preprocessing.unringing import remove_gibbs_real

        signal, _ = _bssfp_signal(files)
        parts = np.concatenate([signal.real, signal.imag], axis=-1)
        parts = parts[..., :reduced] if reduced else parts
        remove_gibbs_real(parts, method=method)
        return {"volumes": parts.shape[-1]}
    if step == "gibbs_dwi":
        from bssfp2dt.preprocessing.unringing import remove_gibbs_real

        data = _dwi(files)[0]
        data = data[..., :reduced] if reduced else data
        remove_gibbs_real(data, method=method)
        return {"volumes": data.shape[-1]}
    if step == "motion":
        data, affine, bvals, bvecs = _dwi(files)
        if reduced:  # the b0s (the reference) and the first diffusion-weighted volumes
            keep = np.concatenate([np.flatnonzero(bvals <= dwi_steps.B0_THRESHOLD),
                                   np.flatnonzero(bvals > dwi_steps.B0_THRESHOLD)[:reduced]])
            data, bvals, bvecs = data[..., keep], bvals[keep], bvecs[keep]
        mask = dwi_steps.brain_mask(data, bvals)
        dwi_steps.motion_correct(data, affine, bvals, bvecs, mask=mask, settings=steps.motion_settings(backend),
                                 n_procs=1 if path == "old" else nprocs)
        return {"volumes": int(data.shape[-1])}
    raise ValueError(f"unknown step {step}")


# --------------------------------------------------------------------------- the default chain, per step
def _cpu_seconds() -> float:
    import resource

    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def profile_workflow(bids_dir: Path, out: Path, nprocs: int) -> dict:
    """The default preprocessing chain's steps (``preprocessing.steps``, as the workflow's nodes call them), in
    order; returns ``{"steps": [(name, cpu_s, wall_s)], "paths": {...}}``. The DWI step's parts (Gibbs removal,
    denoising, motion correction, mask) are timed inside it and listed indented."""
    from bssfp2dt.io.bids import phase_units as read_phase_units
    from bssfp2dt.preprocessing import dwi as dwi_steps
    from bssfp2dt.preprocessing import steps
    from bssfp2dt.preprocessing.bssfp import cycle_order

    os.environ[steps.NPROCS_ENV] = os.environ[steps.THREADS_ENV] = str(nprocs)  # as --nprocs N sets them
    rows: list[tuple[str, float, float]] = []

    def timed(name, function, *args, **kwargs):
        cpu, wall = _cpu_seconds(), time.perf_counter()
        result = function(*args, **kwargs)
        rows.append((name, _cpu_seconds() - cpu, time.perf_counter() - wall))
        return result

    for name in ("denoise", "remove_gibbs", "motion_correct", "brain_mask"):
        original = getattr(dwi_steps, name)
        setattr(dwi_steps, name, lambda *a, _f=original, _n=name, **k: timed("  dwi " + _n, _f, *a, **k))
    files = _inputs(bids_dir)
    sidecar = json.loads(Path(str(files["magnitude"]).replace(".nii.gz", ".json")).read_text())
    increments = sidecar.get("PhaseIncrements")
    units = read_phase_units(files["phase"], json.loads(Path(str(files["phase"]).replace(".nii.gz", ".json"))
                                                         .read_text()))
    stem = str(files["dwi"]).replace(".nii.gz", "")
    options = steps.PreprocSettings().node_options()
    t1w = str(files["t1w"])
    folder = {name: str(out / name) for name in ("t1w", "bssfp", "dwi")}
    cpu, wall = _cpu_seconds(), time.perf_counter()
    mask, _ = timed("t1w_mask", steps.t1w_mask, t1w, None, out_dir=folder["t1w"])
    grid, mask_grid, _ = timed("t1w_to_grid", steps.t1w_to_grid, t1w, mask, 2.0, out_dir=folder["t1w"])
    timed("tissue_maps", steps.tissue_maps, grid, mask_grid, out_dir=folder["t1w"])
    complex_path, reference, _ = timed("prepare_bssfp", steps.prepare_bssfp, str(files["magnitude"]),
                                       str(files["phase"]), units, options, out_dir=folder["bssfp"],
                                       cycle_order=list(cycle_order(increments)) if increments else None)
    bssfp_json, _ = timed("register_bssfp_to_t1w", steps.register_to_t1w, t1w, reference, options, "bssfp",
                          out_dir=folder["bssfp"])
    timed("bssfp_to_grid", steps.bssfp_to_grid, complex_path, bssfp_json, grid, mask_grid, options,
          out_dir=folder["bssfp"])
    dwi, bvec, dwi_mask, b0, provenance = timed("preprocess_dwi", steps.preprocess_dwi, str(files["dwi"]),
                                                stem + ".bval", stem + ".bvec", options, out_dir=folder["dwi"])
    tensor, _ = timed("fit_dwi_tensor", steps.fit_dwi_tensor, dwi, stem + ".bval", bvec, dwi_mask,
                      out_dir=folder["dwi"])
    dwi_json, _ = timed("register_dwi_to_t1w", steps.register_to_t1w, t1w, b0, options, "dwi", out_dir=folder["dwi"])
    tensor_grid, _ = timed("tensor_to_grid", steps.tensor_to_grid, tensor, dwi_json, grid, mask_grid,
                           out_dir=folder["dwi"])
    rows.append(("total", _cpu_seconds() - cpu, time.perf_counter() - wall))
    return {"steps": rows, "bssfp_json": bssfp_json, "dwi_json": dwi_json, "tensor": tensor_grid,
            "mask_grid": mask_grid, "motion": provenance.get("motion_correction")}


def tensor_errors(bids_dir: Path, tensor_path: str, mask_path: str) -> str:
    """Median |dFA|, median V1 angle and median MD ratio against the truth's noiseless fit in white matter."""
    import nibabel as nib
    import numpy as np

    from bssfp2dt.dti.maps import tensor_maps
    from bssfp2dt.preprocessing.resampling import resample

    truth = bids_dir / "derivatives" / "bssfp2dt-truth" / "sub-01"
    ours = nib.load(tensor_path)
    tensor = np.asarray(ours.dataobj, dtype=np.float64)
    expected_image = nib.load(truth / "dwi" / "sub-01_space-T1w_desc-noiselessfit_model-tensor_param-diffusivity_"
                                              "dwimap.nii.gz")
    wm_image = nib.load(truth / "anat" / "sub-01_space-T1w_label-WM_probseg.nii.gz")
    expected = resample(np.asarray(expected_image.dataobj, dtype=np.float64), expected_image.affine,
                        tensor.shape[:3], ours.affine)
    wm = resample(np.asarray(wm_image.dataobj, dtype=np.float64), wm_image.affine, tensor.shape[:3], ours.affine)
    mask = (wm > 0.9) & (np.asarray(nib.load(mask_path).dataobj) > 0)
    got, want = tensor_maps(tensor, mask), tensor_maps(expected, mask)
    cosine = np.clip(np.abs(np.sum(got["v1"][mask] * want["v1"][mask], axis=-1)), 0.0, 1.0)
    return (f"white matter ({int(mask.sum())} voxels): median |dFA| "
            f"{np.median(np.abs(got['fa'][mask] - want['fa'][mask])):.4f}, median V1 angle "
            f"{np.median(np.degrees(np.arccos(cosine))):.2f} deg, median MD ratio "
            f"{np.median(got['md'][mask] / want['md'][mask]):.4f}")


def _child_workflow(bids_dir: str, out: str, nprocs: int) -> None:
    import resource

    record = profile_workflow(Path(bids_dir), Path(out), nprocs)
    record["peak_mib"] = max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                             resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss) / 1024
    print("RESULT " + json.dumps(record))


def report_workflow(bids_dir: Path, work: Path, nprocs: int) -> None:
    """Run :func:`profile_workflow` in a fresh interpreter and print its table and accuracy."""
    command = [sys.executable, __file__, "--child-workflow", str(bids_dir), str(work / "workflow"), str(nprocs)]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    lines = [line for line in result.stdout.splitlines() if line.startswith("RESULT ")]
    if result.returncode or not lines:
        raise RuntimeError(f"the default chain failed:\n{result.stderr[-3000:]}")
    record = json.loads(lines[-1][len("RESULT "):])
    print(f"\ndefault preprocessing chain (--nprocs {nprocs}), one fresh process, children included:")
    print(f"{'step':<26}{'CPU s':>8}{'wall s':>8}")
    for name, cpu, wall in record["steps"]:
        print(f"{name:<26}{cpu:>8.1f}{wall:>8.1f}")
    print(f"peak memory {record['peak_mib']:.0f} MiB")
    for step, key in (("register_bssfp", "bssfp_json"), ("register_dwi", "dwi_json")):
        transform = json.loads(Path(record[key]).read_text())["transform"]
        print(f"{step} against the simulated poses: {registration_errors(bids_dir, step, transform)}")
    motion = record["motion"]
    if isinstance(motion, dict):
        print(f"motion correction (no motion simulated within the scan): largest rotation "
              f"{motion['max_rotation_deg']:.3f} deg, largest translation {motion['max_translation_mm']:.3f} mm")
    print(f"tensor on the common grid: {tensor_errors(bids_dir, record['tensor'], record['mask_grid'])}")


def _child(step: str, path: str, bids_dir: str, reduced: int, nprocs: int) -> None:
    import resource

    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu, wall = time.process_time(), time.perf_counter()
    record = run_step(step, path, Path(bids_dir), reduced, nprocs)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    record.update(cpu_s=time.process_time() - cpu + (children.ru_utime - before.ru_utime)
                  + (children.ru_stime - before.ru_stime), wall_s=time.perf_counter() - wall,
                  peak_mib=max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, children.ru_maxrss) / 1024)
    print("RESULT " + json.dumps(record))


def measure(step: str, path: str, bids_dir: Path, reduced: int, nprocs: int) -> dict:
    """Run :func:`run_step` in a fresh interpreter (imports and caches do not carry over between steps)."""
    command = [sys.executable, __file__, "--child", step, path, str(bids_dir), str(reduced), str(nprocs)]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    lines = [line for line in result.stdout.splitlines() if line.startswith("RESULT ")]
    if result.returncode or not lines:
        raise RuntimeError(f"{step} ({path}) failed:\n{result.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


# --------------------------------------------------------------------------- main
def simulate(bids_dir: Path) -> None:
    from bssfp2dt.simulation.dataset import SimulationConfig, simulate_dataset

    started = time.perf_counter()
    simulate_dataset(bids_dir, SimulationConfig(n_subjects=1, bssfp_sessions=1, dwi_sessions=1), progress=False)
    print(f"simulation: {time.perf_counter() - started:.1f} s")


def registration_errors(bids_dir: Path, step: str, transform) -> str:
    """Rotation (deg) and largest displacement in the brain (mm) against the simulator's recorded poses."""
    import nibabel as nib
    import numpy as np

    from bssfp2dt.preprocessing import registration

    truth = bids_dir / "derivatives" / "bssfp2dt-truth" / "sub-01"
    record = json.loads((truth / "sub-01_simulation.json").read_text())
    from bssfp2dt.simulation.geometry import RigidPose

    poses = {scan["modality"]: RigidPose(tuple(scan["pose"]["rotation_deg"]), tuple(scan["pose"]["translation_mm"]))
             for scan in record["subject"]["scans"]}
    modality = "pcbssfp" if step == "register_bssfp" else "dwi"
    expected = poses[modality].matrix @ np.linalg.inv(poses["t1w"].matrix)
    mask = nib.load(truth / "anat" / "sub-01_space-T1w_desc-brain_mask.nii.gz")
    points = np.argwhere(np.asarray(mask.dataobj) > 0) @ mask.affine[:3, :3].T + mask.affine[:3, 3]
    residual = np.linalg.inv(expected) @ np.asarray(transform)
    return (f"{registration.rotation_angle_deg(residual):.3f} deg, "
            f"{registration.displacement_mm(residual, points).max():.2f} mm")


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        _child(sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5]), int(sys.argv[6]))
        return
    if len(sys.argv) > 1 and sys.argv[1] == "--child-workflow":
        _child_workflow(sys.argv[2], sys.argv[3], int(sys.argv[4]))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/bench_preproc"))
    parser.add_argument("--bids-dir", type=Path, help="an existing simulated dataset (skips simulation)")
    parser.add_argument("--nprocs", type=int, default=2, help="workers of the new motion correction")
    parser.add_argument("--reduced", type=int, default=4,
                        help="volumes for the Gibbs and motion-correction steps (0: all)")
    parser.add_argument("--steps", nargs="+", choices=STEPS, default=list(STEPS))
    parser.add_argument("--workflow", action="store_true",
                        help="also profile the default preprocessing chain step by step, with its accuracy")
    parser.add_argument("--workflow-only", action="store_true", help="only that profile (no old/new comparison)")
    args = parser.parse_args()

    from bssfp2dt.preprocessing.unringing import mrdegibbs_available

    print(f"machine: {machine_description()} (shared with other users: timings are indicative; CPU time is "
          "the figure compared)")
    bids_dir = args.bids_dir or args.work / "bids"
    if not bids_dir.exists():
        simulate(bids_dir)
    if args.workflow_only:
        report_workflow(bids_dir, args.work, args.nprocs)
        return
    if not mrdegibbs_available():
        print("mrdegibbs not on the PATH (Debian package mrtrix3): the Gibbs steps compare dipy with dipy")
    print(f"\n{'step':<16}{'volumes':>8}{'old CPU s':>11}{'new CPU s':>11}{'ratio':>8}"
          f"{'old MiB':>9}{'new MiB':>9}  accuracy (old | new)")
    for step in args.steps:
        old = measure(step, "old", bids_dir, args.reduced, args.nprocs)
        new = measure(step, "new", bids_dir, args.reduced, args.nprocs)
        ratio = (old["cpu_s"] / old["volumes"]) / (new["cpu_s"] / new["volumes"])
        accuracy = ""
        if "transform" in old:
            accuracy = f"{registration_errors(bids_dir, step, old['transform'])} | " \
                       f"{registration_errors(bids_dir, step, new['transform'])}"
        print(f"{step:<16}{new['volumes']:>8}{old['cpu_s']:>11.1f}{new['cpu_s']:>11.1f}{ratio:>7.1f}x"
              f"{old['peak_mib']:>9.0f}{new['peak_mib']:>9.0f}  {accuracy}", flush=True)
    if args.workflow:
        report_workflow(bids_dir, args.work, args.nprocs)


if __name__ == "__main__":
    main()
