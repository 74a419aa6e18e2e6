"""The moving image, its label map and the displacement field from a map given on a coarse lattice.

``register``'s map from the fixed grid to the moving image is trilinear between the points of a
lattice over the fixed grid (a whole number of fixed voxels apart: see ``register._lattice``).
Upsampling it to every voxel and then calling ``grid_sample`` twice (image trilinear, labels
nearest) makes four full-size passes over memory; this kernel makes one: per output plane the
lattice is interpolated along D, per row along H, per voxel along W, and the image and the labels
are read at that point, with what ``grid_sample`` (align_corners, border padding) gives: the point
clamped into the volume, trilinear weights for the image, the nearest voxel (half to even) for
the labels. A second kernel interpolates the displacement field the same way, column by column
in NIfTI's memory order (one pass where torch's upsampling made one per axis). Compiled by numba
(cached on disk), slabs of both run on threads (the kernels release the GIL).
"""
from __future__ import annotations

import functools
from concurrent.futures import ThreadPoolExecutor

import numpy as np


@functools.lru_cache(maxsize=1)
def _kernels():
    import numba  # ~0.2 s, and ~0.25 s more at the first call: imported where the first warp needs it

    @numba.njit(nogil=True, cache=True, fastmath=True, boundscheck=False)
    def warp_planes(lattice, iz, fz, iy, fy, ix, fx, image, labels, out_image, out_labels, z_start, z_stop):
        d, h, w = image.shape
        hw = h * w
        lat_h, lat_w = lattice.shape[1], lattice.shape[2]
        n = out_image.shape[2]
        plane = np.empty((lat_h, lat_w, 3), dtype=np.float32)
        row = np.empty((3, lat_w), dtype=np.float32)
        pz, py, px = np.empty(n, np.float32), np.empty(n, np.float32), np.empty(n, np.float32)
        flat, flat_labels = image.reshape(-1), labels.reshape(-1)
        with_labels = out_labels.shape[0] > 0
        for z in range(z_start, z_stop):
            a, t = iz[z], fz[z]
            for p in range(lat_h):
                for q in range(lat_w):
                    for c in range(3):
                        plane[p, q, c] = lattice[a, p, q, c] + t * (lattice[a + 1, p, q, c] - lattice[a, p, q, c])
            for y in range(out_image.shape[1]):
                b, s = iy[y], fy[y]
                for q in range(lat_w):
                    for c in range(3):
                        row[c, q] = plane[b, q, c] + s * (plane[b + 1, q, c] - plane[b, q, c])
                # the row's points, clamped into the volume (border padding); a loop of its own so
                # that it vectorises, apart from the gathers below
                for x in range(n):
                    e, r = ix[x], fx[x]
                    pz[x] = min(max(row[0, e] + r * (row[0, e + 1] - row[0, e]), np.float32(0)), np.float32(d - 1))
                    py[x] = min(max(row[1, e] + r * (row[1, e + 1] - row[1, e]), np.float32(0)), np.float32(h - 1))
                    px[x] = min(max(row[2, e] + r * (row[2, e + 1] - row[2, e]), np.float32(0)), np.float32(w - 1))
                out_row = out_image[z, y]
                for x in range(n):
                    z0, y0, x0 = min(int(pz[x]), d - 2), min(int(py[x]), h - 2), min(int(px[x]), w - 2)
                    wz, wy, wx = pz[x] - z0, py[x] - y0, px[x] - x0
                    i = z0 * hw + y0 * w + x0
                    c00 = flat[i] + wx * (flat[i + 1] - flat[i])
                    c01 = flat[i + w] + wx * (flat[i + w + 1] - flat[i + w])
                    c10 = flat[i + hw] + wx * (flat[i + hw + 1] - flat[i + hw])
                    c11 = flat[i + hw + w] + wx * (flat[i + hw + w + 1] - flat[i + hw + w])
                    c0 = c00 + wy * (c01 - c00)
                    c1 = c10 + wy * (c11 - c10)
                    out_row[x] = c0 + wz * (c1 - c0)
                if with_labels:  # the nearest voxel, ties to even (grid_sample's nearbyint)
                    label_row = out_labels[z, y]
                    for x in range(n):
                        label_row[x] = flat_labels[int(np.rint(pz[x])) * hw + int(np.rint(py[x])) * w + int(np.rint(px[x]))]

    @numba.njit(nogil=True, cache=True, fastmath=True, boundscheck=False)
    def field_columns(lattice, iz, fz, iy, fy, ix, fx, out, x_start, x_stop):
        # out (3, W, H, D): NIfTI's memory order, written along D; interpolated along W, H, then D
        lat_d, lat_h = lattice.shape[0], lattice.shape[1]
        plane = np.empty((lat_d, lat_h, 3), dtype=np.float32)
        column = np.empty((3, lat_d), dtype=np.float32)
        for x in range(x_start, x_stop):
            e, r = ix[x], fx[x]
            for p in range(lat_d):
                for q in range(lat_h):
                    for c in range(3):
                        plane[p, q, c] = lattice[p, q, e, c] + r * (lattice[p, q, e + 1, c] - lattice[p, q, e, c])
            for y in range(out.shape[2]):
                b, s = iy[y], fy[y]
                for p in range(lat_d):
                    for c in range(3):
                        column[c, p] = plane[p, b, c] + s * (plane[p, b + 1, c] - plane[p, b, c])
                for c in range(3):
                    line = out[c, x, y]
                    for z in range(out.shape[3]):
                        a, t = iz[z], fz[z]
                        line[z] = column[c, a] + t * (column[c, a + 1] - column[c, a])

    return warp_planes, field_columns


def _axis(size: int, step: int, crop: int, lattice_size: int):
    """Per output voxel along one axis: the lattice point below it (so that point + 1 exists)
    and the fraction of the way to the next."""
    position = (np.arange(size) + crop) / step
    below = np.minimum(np.floor(position).astype(np.int64), lattice_size - 2)
    return below, (position - below).astype(np.float32)


def _at_least_two(volume: np.ndarray) -> np.ndarray:
    """The kernel reads point + 1 along every axis: a single-point axis is repeated (sampling the
    copy gives what border padding gives)."""
    if min(volume.shape[:3]) >= 2:
        return volume
    return np.ascontiguousarray(np.broadcast_to(volume, tuple(max(n, 2) for n in volume.shape[:3]) + volume.shape[3:]))


def warp_through_lattice(lattice: np.ndarray, steps, crops, shape, image: np.ndarray,
                         labels: np.ndarray | None = None, threads: int = 1, field: np.ndarray | None = None):
    """``image`` (D, H, W) and ``labels`` (the same grid, integers) sampled at the points of an
    output grid of ``shape``, whose voxel coordinates in the image are given on ``lattice``
    ((d, h, w, 3), channels along D, H, W): output voxel ``v`` lies at lattice coordinate
    ``(v + crops) / steps``; ``field`` ((d, h, w, 3) on the same lattice) is interpolated to every
    output voxel too. ``threads`` slabs of each run side by side. Returns the warped image
    (float32), labels (int32; None without labels) and the field ((3, D, H, W), a view of
    (3, W, H, D) memory: NIfTI's order; None without one)."""
    lattice = _at_least_two(np.ascontiguousarray(lattice, dtype=np.float32))
    axes = [_axis(n, int(s), int(c), lattice.shape[k]) for k, (n, s, c) in enumerate(zip(shape, steps, crops))]
    image = _at_least_two(np.ascontiguousarray(image, dtype=np.float32))
    out_image = np.empty(tuple(shape), dtype=np.float32)
    if labels is None:  # one compiled signature: labels are int32 or absent (an empty output)
        labels_in, out_labels = np.zeros((1, 1, 1), dtype=np.int32), np.zeros((0, 0, 0), dtype=np.int32)
    else:
        labels_in = _at_least_two(np.ascontiguousarray(labels, dtype=np.int32))
        out_labels = np.empty(tuple(shape), dtype=np.int32)
    warp_planes, field_columns = _kernels()
    jobs = [(warp_planes, (lattice, *axes[0], *axes[1], *axes[2], image, labels_in, out_image, out_labels), shape[0])]
    out_field = None
    if field is not None:
        field = _at_least_two(np.ascontiguousarray(field, dtype=np.float32))
        out_field = np.empty((3, shape[2], shape[1], shape[0]), dtype=np.float32)
        jobs.append((field_columns, (field, *axes[0], *axes[1], *axes[2], out_field), shape[2]))
    pieces = [(kernel, args, int(a), int(b)) for kernel, args, n in jobs
              for a, b in _slabs(n, threads)]
    if threads <= 1:
        for kernel, args, a, b in pieces:
            kernel(*args, a, b)
    else:
        with ThreadPoolExecutor(threads) as pool:
            for done in [pool.submit(kernel, *args, a, b) for kernel, args, a, b in pieces]:
                done.result()
    field_out = None if out_field is None else out_field.transpose(0, 3, 2, 1)
    return out_image, (None if labels is None else out_labels), field_out


def _slabs(n: int, threads: int):
    cuts = np.linspace(0, n, max(1, min(threads, n)) + 1).astype(int)
    return list(zip(cuts[:-1], cuts[1:]))


def load_kernels() -> None:
    """Import numba and load both compiled kernels (compiled and cached on disk at their first use
    on a machine): about 0.5 s a process, paid here rather than inside the first timed warp."""
    warp_through_lattice(np.zeros((2, 2, 2, 3), np.float32), (1, 1, 1), (0, 0, 0), (2, 2, 2),
                         np.zeros((2, 2, 2), np.float32), np.zeros((2, 2, 2), np.int32), field=np.zeros((2, 2, 2, 3), np.float32))
