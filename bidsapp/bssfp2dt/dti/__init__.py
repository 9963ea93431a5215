"""Pure diffusion-tensor cores (numpy only): component orders, eigen-decomposition, maps, WLS fit.

Tensors are (..., 6) arrays in BEP016 order D11, D12, D13, D22, D23, D33 (mm^2/s).
"""
from bssfp2dt.dti.eigen import (bep016_to_dipy, bep016_to_fsl, bep016_to_matrix, dipy_to_bep016, eigh_tensor,
                                fsl_to_bep016, matrix_to_bep016)
from bssfp2dt.dti.fit import design_matrix, dwi_signal, fit_tensor
from bssfp2dt.dti.maps import MAP_NAMES, color_fa, tensor_maps, v1_angles

__all__ = ["MAP_NAMES", "bep016_to_dipy", "bep016_to_fsl", "bep016_to_matrix", "color_fa", "design_matrix",
           "dipy_to_bep016", "dwi_signal", "eigh_tensor", "fit_tensor", "fsl_to_bep016", "matrix_to_bep016",
           "tensor_maps", "v1_angles"]
