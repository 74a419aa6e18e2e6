"""Pictures to check a registration by eye: three orthogonal slices through the fixed image's
foreground centre, with (1) the warped moving image's edges drawn on the fixed image, (2) a
checkerboard of the two, (3) the Jacobian determinant of the map (1: volume kept; below 1
shrinking, above 1 growing; folding, <= 0, in black)."""
from __future__ import annotations

import numpy as np

from .io import atomic_path
from .preprocessing import mask_bounds


def _normalised(volume: np.ndarray) -> np.ndarray:
    step = max(1, round((volume.size / 2e5) ** (1 / 3)))
    lo, hi = np.percentile(volume[::step, ::step, ::step], [1, 99])
    return np.clip((volume - lo) / max(hi - lo, 1e-6), 0, 1)


def _slices(volume: np.ndarray, centre) -> list[np.ndarray]:
    """Sagittal, coronal and axial slices (RAS voxel axes), transposed for display (up is +z)."""
    i, j, k = centre
    return [volume[i, :, :].T, volume[:, j, :].T, volume[:, :, k].T]


def _checkerboard(a: np.ndarray, b: np.ndarray, squares: int = 8) -> np.ndarray:
    size = max(1, max(a.shape) // squares)
    rows, cols = np.indices(a.shape)
    return np.where(((rows // size) + (cols // size)) % 2 == 0, a, b)


def qc_figure(fixed: np.ndarray, warped: np.ndarray, jacobian: np.ndarray, spacing, path, title: str = "") -> None:
    """Write the picture (PNG) of one registration: ``fixed`` and ``warped`` on the fixed grid,
    ``jacobian`` its determinant there, ``spacing`` the voxel size (mm) for the aspect ratio."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fixed_n, warped_n = _normalised(fixed), _normalised(warped)
    first, last = mask_bounds(fixed_n > 0.1)
    centre = tuple((first + last) // 2)
    sx, sy, sz = (float(s) for s in spacing)
    aspects = [sz / sy, sz / sx, sy / sx]  # row spacing / column spacing of each transposed slice
    names = ["sagittal", "coronal", "axial"]
    jac_cmap = plt.get_cmap("RdBu_r").with_extremes(under="black")
    fig, axes = plt.subplots(3, 3, figsize=(10, 10), constrained_layout=True)
    for col, (f, w, j, aspect, name) in enumerate(zip(_slices(fixed_n, centre), _slices(warped_n, centre),
                                                       _slices(jacobian, centre), aspects, names)):
        axes[0, col].imshow(f, cmap="gray", origin="lower", aspect=aspect)
        # the warped image's edges: where its smoothed intensity crosses mid-grey and the tissue border
        axes[0, col].contour(w, levels=[0.15, 0.5], colors=["#ffcc00", "#ff3300"], linewidths=0.6, origin="lower")
        axes[0, col].set_title(f"{name}: fixed + warped edges", fontsize=9)
        axes[1, col].imshow(_checkerboard(f, w), cmap="gray", origin="lower", aspect=aspect)
        axes[1, col].set_title("checkerboard fixed / warped", fontsize=9)
        shown = axes[2, col].imshow(j, cmap=jac_cmap, vmin=1e-6, vmax=2.0, origin="lower", aspect=aspect,
                                    interpolation="nearest")
        axes[2, col].set_title("Jacobian determinant (black: folding)", fontsize=9)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.colorbar(shown, ax=axes[2, :], shrink=0.7, extend="both")
    folding = float((jacobian <= 0).mean()) * 100
    fig.suptitle(f"{title}  (folding {folding:.3f} %, det {np.percentile(jacobian, 1):.2f}-"
                 f"{np.percentile(jacobian, 99):.2f} at 1-99 %)", fontsize=10)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=80, format="png")
    plt.close(fig)
