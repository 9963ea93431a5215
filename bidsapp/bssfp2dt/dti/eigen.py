"""Tensor component orders and a vectorised eigen-decomposition of symmetric 3x3 diffusion tensors.

Tensors are arrays of shape (..., 6) in BEP016 order D11, D12, D13, D22, D23, D33
(= Dxx, Dxy, Dxz, Dyy, Dyz, Dzz), in mm^2/s. FSL's DTIFIT ``_tensor`` file uses the same order;
dipy's ``lower_triangular`` order is Dxx, Dxy, Dyy, Dxz, Dyz, Dzz.

Eigen-decomposition (``eigh_tensor``, ``eigen_planar``), float64, vectorised over blocks of voxels:

1. Eigenvalues by the trigonometric closed form of Smith (1961), Commun. ACM 4(4):168.
   With q = trace/3, p = sqrt(sum((lambda_i - q)^2) / 6) and r = det(D - qI) / (2 p^3),
   lambda_k = q + 2 p cos(arccos(r)/3 + 2 pi k/3), k = 0 (largest), 2 (smallest), lambda_2 = 3q - l1 - l3.
2. Well separated eigenvalues (both gaps >= ``CLOSE_PAIR`` * p, almost every voxel): v1 and v3 are the
   null vectors of D - lambda I, i.e. the longest column of its adjugate (= the longest cross product
   of two of its rows); v3 is re-orthogonalised against v1 and v2 = v3 x v1. The closed form's
   eigenvalue error is ~eps ||D|| p / gap, so the vectors are within a factor p / gap <= 20 of the
   accuracy any backward-stable solver has (~eps ||D|| / gap).
3. Two close eigenvalues (a gap < ``CLOSE_PAIR`` * p; e.g. cylindrical tensors with lambda_2 = lambda_3):
   the third, *isolated* eigenvalue is at least sqrt(3) p from both, so its eigenvector (step 2) is well
   conditioned and its eigenvalue is refined by the Rayleigh quotient; the close pair comes from the 2x2
   matrix of D on the plane orthogonal to it (deflation) with stable 2x2 formulas, which stay accurate
   for equal eigenvalues (their vectors are then any orthonormal pair of that plane, as for any solver).
4. Fallback criterion: p <= ``NEARLY_ISOTROPIC`` * ||D||_F (Frobenius norm), i.e. all three eigenvalues
   nearly equal (FA = 3 p / ||D||_F <= 3e-6), where r = det / p^3 divides rounding noise by p^3 and
   every eigenvector is undefined anyway: ``numpy.linalg.eigh``. Exact multiples of the identity q I
   (e.g. all-zero tensors) get q and the basis (e_z, e_y, e_x) (what eigh returns) without LAPACK.
5. Tensors with ||D||_F outside [1e-75, 1e75] (squares or p^3 would under/overflow) are redone on
   D / max|D_ij|, so the result does not depend on the units.
Measured against LAPACK on random, degenerate and extreme-scale tensors: reconstruction, orthonormality
and eigenvalue errors <= 2e-14 relative to max|D_ij|.
"""
from __future__ import annotations

import numpy as np

#: Relative anisotropy p / ||D||_F below which a voxel is solved with numpy.linalg.eigh.
NEARLY_ISOTROPIC = 1e-6
#: Smallest eigenvalue gap, relative to p, for eigenvectors by cross products; closer pairs use deflation.
CLOSE_PAIR = 0.05
#: Voxels per block of the closed form: blocks of this size keep the temporaries in cache.
CHUNK_VOXELS = 16384

# BEP016 component k -> (row, column) of the symmetric matrix.
_BEP016_INDEX = ((0, 0), (0, 1), (0, 2), (1, 1), (1, 2), (2, 2))
# Swapping components 2 and 3 maps BEP016 <-> dipy lower-triangular (the permutation is its own inverse).
_BEP016_DIPY_PERMUTATION = [0, 1, 3, 2, 4, 5]


def _check_six(tensor6: np.ndarray) -> np.ndarray:
    tensor6 = np.asarray(tensor6)
    if tensor6.shape[-1:] != (6,):
        raise ValueError(f"expected a tensor array of shape (..., 6), got {tensor6.shape}")
    return tensor6


def bep016_to_dipy(tensor6: np.ndarray) -> np.ndarray:
    """BEP016 (Dxx, Dxy, Dxz, Dyy, Dyz, Dzz) -> dipy lower-triangular (Dxx, Dxy, Dyy, Dxz, Dyz, Dzz); (..., 6)."""
    return _check_six(tensor6)[..., _BEP016_DIPY_PERMUTATION]


def dipy_to_bep016(lower_triangular: np.ndarray) -> np.ndarray:
    """dipy lower-triangular (Dxx, Dxy, Dyy, Dxz, Dyz, Dzz) -> BEP016 (Dxx, Dxy, Dxz, Dyy, Dyz, Dzz); (..., 6)."""
    return _check_six(lower_triangular)[..., _BEP016_DIPY_PERMUTATION]


def bep016_to_fsl(tensor6: np.ndarray) -> np.ndarray:
    """BEP016 -> FSL DTIFIT tensor order; the orders are identical, so this is a copy; (..., 6)."""
    return np.array(_check_six(tensor6), copy=True)


def fsl_to_bep016(tensor6: np.ndarray) -> np.ndarray:
    """FSL DTIFIT tensor order -> BEP016; the orders are identical, so this is a copy; (..., 6)."""
    return np.array(_check_six(tensor6), copy=True)


def bep016_to_matrix(tensor6: np.ndarray) -> np.ndarray:
    """BEP016 components (..., 6) -> symmetric matrices (..., 3, 3), same dtype and units."""
    tensor6 = _check_six(tensor6)
    matrix = np.empty(tensor6.shape[:-1] + (3, 3), dtype=tensor6.dtype)
    for component, (row, column) in enumerate(_BEP016_INDEX):
        matrix[..., row, column] = tensor6[..., component]
        matrix[..., column, row] = tensor6[..., component]
    return matrix


def matrix_to_bep016(matrix: np.ndarray) -> np.ndarray:
    """Symmetric matrices (..., 3, 3) -> BEP016 components (..., 6), averaging the two off-diagonal halves."""
    matrix = np.asarray(matrix)
    if matrix.shape[-2:] != (3, 3):
        raise ValueError(f"expected matrices of shape (..., 3, 3), got {matrix.shape}")
    return np.stack([0.5 * (matrix[..., row, column] + matrix[..., column, row])
                     for row, column in _BEP016_INDEX], axis=-1)


def mask_voxels(mask: np.ndarray | None, batch_shape: tuple[int, ...]) -> np.ndarray | None:
    """Flat indices (int64) of the voxels in ``mask`` (shape ``batch_shape``), or None for all voxels."""
    if mask is None:
        return None
    mask = np.asarray(mask, dtype=bool)
    if mask.shape != tuple(batch_shape):
        raise ValueError(f"mask shape {mask.shape} does not match tensor shape {tuple(batch_shape)}")
    return np.flatnonzero(mask)


def planar_blocks(tensor6: np.ndarray, voxels: np.ndarray | None, block: int = CHUNK_VOXELS):
    """Blocks of tensors in planar layout, for vectorised work that stays in cache.

    Parameters
    ----------
    tensor6 : (..., 6) BEP016 components.
    voxels : flat voxel indices to visit (from ``mask_voxels``), or None for all voxels.

    Yields
    ------
    index : slice or (V,) int array of flat voxel indices.
    components : (6, V) contiguous float64; non-finite tensors replaced by zeros.
    finite : (V,) bool, False where a component was non-finite, or None when all are finite.
    """
    flat = _check_six(tensor6).reshape(-1, 6)
    n_voxels = flat.shape[0] if voxels is None else voxels.size
    for start in range(0, n_voxels, block):
        index = slice(start, min(start + block, n_voxels)) if voxels is None else voxels[start:start + block]
        components = np.ascontiguousarray(flat[index].T, dtype=np.float64)
        finite = np.isfinite(components).all(axis=0)
        if finite.all():
            yield index, components, None
        else:
            components[:, ~finite] = 0.0
            yield index, components, finite


def eigh_tensor(tensor6: np.ndarray, mask: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Eigenvalues and eigenvectors of symmetric tensors given as BEP016 components.

    Parameters
    ----------
    tensor6 : (..., 6) BEP016 components (any float dtype; computed in float64), e.g. mm^2/s.
    mask : (...) bool, optional; voxels outside it are not computed.

    Returns
    -------
    evals : (..., 3) float64, eigenvalues sorted descending, same units as the tensor; not clipped.
    evecs : (..., 3, 3) float64, unit eigenvectors as columns: ``evecs[..., :, j]`` belongs to
        ``evals[..., j]``; each vector's sign is arbitrary.
    Voxels outside ``mask`` or with any non-finite component get zero eigenvalues and zero vectors;
    exactly isotropic tensors q I (all-zero ones too) get the vectors (e_z, e_y, e_x), as numpy.linalg.eigh.
    """
    tensor6 = _check_six(tensor6)
    batch_shape = tensor6.shape[:-1]
    evals = np.zeros((int(np.prod(batch_shape)), 3))
    evecs = np.zeros((evals.shape[0], 3, 3))
    for index, components, finite in planar_blocks(tensor6, mask_voxels(mask, batch_shape)):
        values, vectors = eigen_planar(components)
        if finite is not None:
            values[:, ~finite] = 0.0
            vectors[:, :, ~finite] = 0.0
        evals[index] = values.T
        evecs[index] = vectors.transpose(2, 0, 1)
    return evals.reshape(batch_shape + (3,)), evecs.reshape(batch_shape + (3, 3))


def eigen_planar(components: np.ndarray, first_vector_only: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Eigen-decomposition of finite tensors in planar layout (the building block of ``eigh_tensor``).

    Parameters
    ----------
    components : (6, V) float64 contiguous, BEP016 order, finite.
    first_vector_only : return only the principal eigenvector (less work).

    Returns
    -------
    evals : (3, V), descending.
    evecs : (3, 3, V) with ``evecs[i, j]`` = component i of eigenvector j, or (3, 1, V) with only V1.
    """
    n_vectors = 1 if first_vector_only else 3
    # Every voxel goes through the closed form (compressing the few special ones out first would cost more
    # than it saves); the nearly isotropic ones, whose p ~ 0 may give inf/NaN, are overwritten afterwards.
    with np.errstate(divide="ignore", invalid="ignore", over="ignore", under="ignore"):
        evals, evecs, out_of_range = _eigen_unscaled(components, n_vectors)
        if out_of_range.any():
            # Rare tensors whose squares or p^3 would under/overflow: redo them on D / max|D_ij|.
            subset = components[:, out_of_range]
            scale = np.abs(subset).max(axis=0)
            values, vectors, _ = _eigen_unscaled(np.ascontiguousarray(subset / scale), n_vectors)
            evals[:, out_of_range], evecs[:, :, out_of_range] = values * scale, vectors
    return evals, evecs


def _eigen_unscaled(components: np.ndarray, n_vectors: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``eigen_planar`` for tensors of moderate scale; also returns the (V,) mask of out-of-range ones."""
    dxx, dxy, dxz, dyy, dyz, dzz = components
    q = (dxx + dyy + dzz) / 3.0
    axx, ayy, azz = dxx - q, dyy - q, dzz - q
    off_diagonal_sq = dxy * dxy + dxz * dxz + dyz * dyz
    p_sq = (axx * axx + ayy * ayy + azz * azz + 2.0 * off_diagonal_sq) / 6.0
    frobenius_sq = dxx * dxx + dyy * dyy + dzz * dzz + 2.0 * off_diagonal_sq
    isotropic = p_sq <= (NEARLY_ISOTROPIC * NEARLY_ISOTROPIC) * frobenius_sq
    zero = frobenius_sq == 0.0
    if zero.any():  # exactly zero, or tiny entries whose squares underflowed (redone as out of range)
        zero[zero] = ~components[:, zero].any(axis=0)
    # ||D||_F in [1e-75, 1e75] keeps p^3 >= (1e-6 ||D||_F)^3 and every square normal.
    out_of_range = ~((frobenius_sq >= 1e-150) & (frobenius_sq <= 1e150)) & ~zero
    p = np.sqrt(p_sq)

    det = axx * (ayy * azz - dyz * dyz) - dxy * (dxy * azz - dyz * dxz) + dxz * (dxy * dyz - ayy * dxz)
    phi = np.arccos(np.minimum(np.maximum(det / (2.0 * p * p * p), -1.0), 1.0)) / 3.0
    evals = np.empty((3, components.shape[1]))
    cos_phi = np.cos(phi)
    # cos(phi + 2 pi/3) = -(cos phi + sqrt(3) sin phi) / 2, sin phi >= 0 on [0, pi/3]: saves a cos; the
    # sqrt loses accuracy only for phi ~ 0, i.e. lambda_2 ~ lambda_3, which _deflated recomputes.
    sin_phi = np.sqrt(np.maximum(1.0 - cos_phi * cos_phi, 0.0))
    evals[0] = q + 2.0 * p * cos_phi
    evals[2] = q - p * (cos_phi + np.sqrt(3.0) * sin_phi)
    evals[1] = 3.0 * q - evals[0] - evals[2]
    evecs = _separated_vectors(components, evals, n_vectors)

    close_pair = np.minimum(evals[0] - evals[1], evals[1] - evals[2]) < CLOSE_PAIR * p
    close_pair &= ~isotropic & ~out_of_range
    if close_pair.any():
        evals[:, close_pair], evecs[:, :, close_pair] = _deflated(
            np.ascontiguousarray(components[:, close_pair]), evals[:, close_pair], phi[close_pair], n_vectors)
    isotropic &= ~out_of_range
    if isotropic.any():
        evals[:, isotropic], evecs[:, :, isotropic] = _nearly_isotropic(components[:, isotropic], n_vectors)
    return evals, evecs, out_of_range


def _nearly_isotropic(components: np.ndarray, n_vectors: int) -> tuple[np.ndarray, np.ndarray]:
    """(6, V) -> (3, V), (3, n_vectors, V): numpy.linalg.eigh, except for exact multiples of I (e.g. 0)."""
    dxx, dxy, dxz, dyy, dyz, dzz = components
    scalar = (dxx == dyy) & (dyy == dzz) & (dxy == 0.0) & (dxz == 0.0) & (dyz == 0.0)
    evals = np.empty((3, components.shape[1]))
    evecs = np.empty((3, n_vectors, components.shape[1]))
    evals[:, scalar] = dxx[scalar]
    evecs[:, :, scalar] = np.eye(3)[::-1, :n_vectors, None]  # what eigh returns, reordered: e_z, e_y, e_x
    if not scalar.all():
        evals[:, ~scalar], evecs[:, :, ~scalar] = _lapack(components[:, ~scalar], n_vectors)
    return evals, evecs


def _lapack(components: np.ndarray, n_vectors: int) -> tuple[np.ndarray, np.ndarray]:
    """numpy.linalg.eigh on (6, V) planar tensors -> descending (3, V), (3, n_vectors, V)."""
    values, vectors = np.linalg.eigh(bep016_to_matrix(components.T))
    return values[:, ::-1].T, vectors[:, :, ::-1][:, :, :n_vectors].transpose(1, 2, 0)


def _separated_vectors(components, evals, n_vectors):
    """Eigenvectors (3, n_vectors, V) for well separated eigenvalues (3, V): null vectors of D - lambda I."""
    dxx, dxy, dxz, dyy, dyz, dzz = components
    evecs = np.empty((3, n_vectors, components.shape[1]))
    first = _null_vector(dxx - evals[0], dxy, dxz, dyy - evals[0], dyz, dzz - evals[0])
    for i in range(3):
        evecs[i, 0] = first[i]
    if n_vectors == 3:
        third = _null_vector(dxx - evals[2], dxy, dxz, dyy - evals[2], dyz, dzz - evals[2])
        # Gram-Schmidt against v1: the two null vectors are computed independently, so their rounding
        # errors (~eps ||D|| / gap) would otherwise show up as a loss of orthogonality.
        overlap = third[0] * first[0] + third[1] * first[1] + third[2] * first[2]
        third = tuple(t - overlap * f for t, f in zip(third, first))
        norm = np.sqrt(third[0] * third[0] + third[1] * third[1] + third[2] * third[2])
        third = tuple(t / norm for t in third)
        for i in range(3):
            evecs[i, 2] = third[i]
        # v2 = v3 x v1 makes (v1, v2, v3) right-handed.
        evecs[0, 1] = third[1] * first[2] - third[2] * first[1]
        evecs[1, 1] = third[2] * first[0] - third[0] * first[2]
        evecs[2, 1] = third[0] * first[1] - third[1] * first[0]
    return evecs


def _deflated(components, evals, phi, n_vectors):
    """Eigenpairs where two eigenvalues are close: (6, V), Smith's (3, V), phi (V,) -> (3, V), (3, n, V).

    The isolated eigenvector comes from the cross products, the close pair from the 2x2 problem on the
    orthogonal plane, whose stable formulas keep both eigenvalues and vectors accurate even when equal.
    """
    largest_isolated = phi <= np.pi / 6.0
    isolated_value = np.where(largest_isolated, evals[0], evals[2])
    dxx, dxy, dxz, dyy, dyz, dzz = components
    vx, vy, vz = _null_vector(dxx - isolated_value, dxy, dxz, dyy - isolated_value, dyz, dzz - isolated_value)
    isolated_value = _quadratic_form(components, vx, vy, vz, vx, vy, vz)  # Rayleigh quotient: 2nd-order exact

    (ux, uy, uz), (wx, wy, wz) = _orthonormal_complement(vx, vy, vz)
    m_uu = _quadratic_form(components, ux, uy, uz, ux, uy, uz)
    m_uw = _quadratic_form(components, ux, uy, uz, wx, wy, wz)
    m_ww = _quadratic_form(components, wx, wy, wz, wx, wy, wz)
    half_sum = 0.5 * (m_uu + m_ww)
    half_difference = 0.5 * (m_uu - m_ww)
    radius = _hypot(half_difference, m_uw)
    cos_a, sin_a = _upper_eigenvector_2x2(half_difference, m_uw, radius)
    upper = (cos_a * ux + sin_a * wx, cos_a * uy + sin_a * wy, cos_a * uz + sin_a * wz)  # of half_sum + radius

    evals = np.empty_like(evals)
    evals[0] = np.where(largest_isolated, isolated_value, half_sum + radius)
    evals[1] = np.where(largest_isolated, half_sum + radius, half_sum - radius)
    evals[2] = np.where(largest_isolated, half_sum - radius, isolated_value)
    isolated = (vx, vy, vz)
    evecs = np.empty((3, n_vectors, components.shape[1]))
    for i in range(3):
        evecs[i, 0] = np.where(largest_isolated, isolated[i], upper[i])
    if n_vectors == 3:
        lower = (cos_a * wx - sin_a * ux, cos_a * wy - sin_a * uy, cos_a * wz - sin_a * uz)
        for i in range(3):
            evecs[i, 1] = np.where(largest_isolated, upper[i], lower[i])
            evecs[i, 2] = np.where(largest_isolated, lower[i], isolated[i])
    return evals, evecs


def _hypot(a, b):
    """sqrt(a^2 + b^2) without underflow of the squares (np.hypot is ~10x slower)."""
    largest = np.maximum(np.abs(a), np.abs(b))
    largest[largest == 0.0] = 1.0
    a_scaled, b_scaled = a / largest, b / largest
    return largest * np.sqrt(a_scaled * a_scaled + b_scaled * b_scaled)


def _upper_eigenvector_2x2(half_difference, off_diagonal, radius):
    """Unit eigenvector (c, s) of [[h + m, b], [b, m - h]] for its larger eigenvalue m + radius.

    (radius + |h|, b) or (b, radius + |h|), whichever avoids cancellation; (1, 0) if the matrix is scalar.
    """
    longer = radius + np.abs(half_difference)
    longer += longer == 0.0  # scalar 2x2 block: any vector is an eigenvector
    ratio = off_diagonal / longer  # |ratio| <= 1 since radius >= |b|; squaring longer itself could underflow
    norm = longer * np.sqrt(1.0 + ratio * ratio)
    first = half_difference >= 0.0
    cosine = np.where(first, longer, off_diagonal) / norm
    sine = np.where(first, off_diagonal, longer) / norm
    # Renormalise: with subnormal inputs (entries ~1e-300 of a unit-scaled tensor) the division above
    # keeps only a few bits.
    length = np.sqrt(cosine * cosine + sine * sine)
    return cosine / length, sine / length


def _null_vector(mxx, mxy, mxz, myy, myz, mzz):
    """Unit null vector (x, y, z), each (V,), of M = D - lambda I for an extreme eigenvalue lambda (l1 or l3).

    adj(M) = kappa v v^T, whose columns are the cross products of pairs of rows of M; the longest
    column, the one with the largest diagonal entry, is the most accurate. For an extreme eigenvalue the
    other two eigenvalues of M share a sign, so kappa > 0 and the diagonal entries are >= 0: no abs().
    """
    a_xx = myy * mzz - myz * myz
    a_xy = mxz * myz - mxy * mzz
    a_xz = mxy * myz - mxz * myy
    a_yy = mxx * mzz - mxz * mxz
    a_yz = mxy * mxz - mxx * myz
    a_zz = mxx * myy - mxy * mxy
    pick_x = (a_xx >= a_yy) & (a_xx >= a_zz)
    pick_y = (a_yy >= a_zz) & ~pick_x
    pick_z = ~(pick_x | pick_y)
    # Select by 0/1 weights: exact for finite entries, and ~2x faster than nested np.where.
    wx, wy, wz = pick_x.astype(np.float64), pick_y.astype(np.float64), pick_z.astype(np.float64)
    vx = a_xx * wx + a_xy * wy + a_xz * wz
    vy = a_xy * wx + a_yy * wy + a_yz * wz
    vz = a_xz * wx + a_yz * wy + a_zz * wz
    scale = 1.0 / np.sqrt(vx * vx + vy * vy + vz * vz)
    vx *= scale
    vy *= scale
    vz *= scale
    return vx, vy, vz


def _orthonormal_complement(vx, vy, vz):
    """Two unit vectors ((x, y, z), (x, y, z)) spanning the plane orthogonal to unit v (Duff et al. 2017)."""
    sign = np.copysign(1.0, vz)
    a = -1.0 / (sign + vz)
    b = vx * vy * a
    u = (1.0 + sign * vx * vx * a, sign * b, -sign * vx)
    w = (b, sign + vy * vy * a, -vy)
    return u, w


def _quadratic_form(components, lx, ly, lz, rx, ry, rz):
    """l^T D r for (6, V) BEP016 tensors and vectors given by their (V,) components -> (V,)."""
    dxx, dxy, dxz, dyy, dyz, dzz = components
    return (lx * (dxx * rx + dxy * ry + dxz * rz) + ly * (dxy * rx + dyy * ry + dyz * rz)
            + lz * (dxz * rx + dyz * ry + dzz * rz))
