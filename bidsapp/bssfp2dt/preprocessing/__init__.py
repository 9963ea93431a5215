"""Preprocessing building blocks: pure functions on arrays and 4x4 affines (mm).

Modules: ``bssfp`` (phase rescale, global phase, Gibbs, channel layout), ``registration`` (rigid and
affine, dipy mutual information), ``resampling`` (scalar/complex/tensor resampling, the common 2 mm
grid), ``normalization`` (dataset-wide [0, 1] ranges, serialisable), ``dwi`` (b0, mask, Gibbs,
denoising, motion correction, b-vectors), ``t1w`` (mask, 6 channels, HMRF tissue maps).
Transform convention (see ``resampling``): a 4x4 world -> world map from the target/static image
to the source/moving image, the direction resampling pulls values along.
"""
