"""Evaluation of predicted tensors against a reference: error maps, tissue statistics, image metrics, reports.

``errors`` (relative and angular error maps), ``statistics`` (tissue-stratified long-format tables),
``metrics`` (PSNR, SSIM, FID), ``figures`` (PNG figures), ``report`` (the participant-level entry point
:func:`~bssfp2dt.evaluation.report.evaluate_participant` and the HTML writers), ``reference_results``
(the reference thesis' published numbers).
"""
