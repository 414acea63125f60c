"""Compiled inner loops of the processing stages (numba, CPU, single thread per worker).

Why numba: the watertight step at 512^3 touches ~135 M grid points and a 1 M-face sculpt; in numpy the
narrow-band distance alone would cost minutes of temporaries. Every kernel here is a plain loop over a
dense array or over faces, compiled once and cached on disk (`cache=True`, next to this file).

Grid conventions (shared with watertight.py): a dense float32 array `dist` of shape (n, n, n), grid point
(i, j, k) at position (i, j, k) in *voxel units*; flattened index = (i * n + j) * n + k.
"""

from __future__ import annotations

import numpy as np
from numba import njit

INF = np.float32(np.inf)


# ----------------------------------------------------------------------------- geometry
@njit(cache=True, inline="always")
def _tri_dist2(px, py, pz, ax, ay, az, bx, by, bz, cx, cy, cz):
    """Squared distance from point p to triangle abc (Ericson, Real-Time Collision Detection, 5.1.5)."""
    abx, aby, abz = bx - ax, by - ay, bz - az
    acx, acy, acz = cx - ax, cy - ay, cz - az
    apx, apy, apz = px - ax, py - ay, pz - az
    d1 = abx * apx + aby * apy + abz * apz
    d2 = acx * apx + acy * apy + acz * apz
    if d1 <= 0.0 and d2 <= 0.0:
        return apx * apx + apy * apy + apz * apz
    bpx, bpy, bpz = px - bx, py - by, pz - bz
    d3 = abx * bpx + aby * bpy + abz * bpz
    d4 = acx * bpx + acy * bpy + acz * bpz
    if d3 >= 0.0 and d4 <= d3:
        return bpx * bpx + bpy * bpy + bpz * bpz
    vc = d1 * d4 - d3 * d2
    if vc <= 0.0 and d1 >= 0.0 and d3 <= 0.0:
        v = d1 / (d1 - d3) if d1 - d3 != 0.0 else 0.0
        qx, qy, qz = apx - v * abx, apy - v * aby, apz - v * abz
        return qx * qx + qy * qy + qz * qz
    cpx, cpy, cpz = px - cx, py - cy, pz - cz
    d5 = abx * cpx + aby * cpy + abz * cpz
    d6 = acx * cpx + acy * cpy + acz * cpz
    if d6 >= 0.0 and d5 <= d6:
        return cpx * cpx + cpy * cpy + cpz * cpz
    vb = d5 * d2 - d1 * d6
    if vb <= 0.0 and d2 >= 0.0 and d6 <= 0.0:
        w = d2 / (d2 - d6) if d2 - d6 != 0.0 else 0.0
        qx, qy, qz = apx - w * acx, apy - w * acy, apz - w * acz
        return qx * qx + qy * qy + qz * qz
    va = d3 * d6 - d5 * d4
    if va <= 0.0 and (d4 - d3) >= 0.0 and (d5 - d6) >= 0.0:
        den = (d4 - d3) + (d5 - d6)
        w = (d4 - d3) / den if den != 0.0 else 0.0
        qx, qy, qz = bpx + w * (bx - cx), bpy + w * (by - cy), bpz + w * (bz - cz)  # p - (b + w (c - b))
        return qx * qx + qy * qy + qz * qz
    den = va + vb + vc
    if den == 0.0:  # degenerate triangle: fall back to the nearest vertex
        da = apx * apx + apy * apy + apz * apz
        db = bpx * bpx + bpy * bpy + bpz * bpz
        dc = cpx * cpx + cpy * cpy + cpz * cpz
        return min(da, min(db, dc))
    v = vb / den
    w = vc / den
    qx = apx - abx * v - acx * w
    qy = apy - aby * v - acy * w
    qz = apz - abz * v - acz * w
    return qx * qx + qy * qy + qz * qz


@njit(cache=True, inline="always")
def _face_dist(px, py, pz, V, F, f):
    # Rounded to float32 *before* any comparison with the stored float32 distances: comparing a float64
    # distance with its own rounded-up copy made equal-distance faces (a shared edge) replace each other
    # forever during propagation.
    a, b, c = F[f, 0], F[f, 1], F[f, 2]
    return np.float32(
        np.sqrt(_tri_dist2(px, py, pz, V[a, 0], V[a, 1], V[a, 2], V[b, 0], V[b, 1], V[b, 2], V[c, 0], V[c, 1], V[c, 2]))
    )


# ----------------------------------------------------------------------------- narrow-band distance
# The big arrays come from np.zeros, which the OS maps lazily: a page that is never written costs nothing.
# So "not computed" is encoded as 0 (dist 0 = +inf, tri 0 = none, faces stored as f + 1) and every kernel
# below only writes near the surface. At 512^3 this saves ~2 CPU-s of page faults per mesh against np.full.
@njit(cache=True, inline="always")
def _push(buf, m, value):
    if m == buf.shape[0]:
        grown = np.empty(buf.shape[0] * 2, np.int64)
        grown[:m] = buf[:m]
        buf = grown
    buf[m] = value
    return buf, m + 1


@njit(cache=True, inline="always")
def _seed_point(i, j, k, n, V, F, f, flat, tflat, out, m, band):
    if i < 0 or j < 0 or k < 0 or i >= n or j >= n or k >= n:
        return out, m
    d = max(_face_dist(np.float32(i), np.float32(j), np.float32(k), V, F, f), np.float32(1e-6))
    if d > band:  # band points must stay near the surface (the flood fill's block painting relies on it)
        return out, m
    idx = (i * n + j) * n + k
    old = flat[idx]
    if old == 0.0 or d < old:
        if old == 0.0:
            out, m = _push(out, m, idx)
        flat[idx] = d
        tflat[idx] = f + 1
    return out, m


@njit(cache=True)
def seed_band(V, F, dist, tri, band):
    """Exact unsigned distance at the grid points around every face, keeping the nearest face per point.
    V is in voxel units; points farther than `band` are left out. A small face seeds the grid points of
    its bounding box (up to 4^3); a large one (a CAD quad,
    a flat cap) seeds the grid points nearest to points sampled on it at < 1 voxel spacing, so seeding
    follows the area, not the bounding box (a box-sized triangle has ~n^3 points in its box).
    Propagation fills in the rest. Returns the seeded flat indices."""
    n = dist.shape[0]
    flat = dist.reshape(-1)
    tflat = tri.reshape(-1)
    out = np.empty(max(16, 8 * F.shape[0]), np.int64)
    m = 0
    for f in range(F.shape[0]):
        a, b, c = F[f, 0], F[f, 1], F[f, 2]
        lo0 = int(np.floor(min(V[a, 0], min(V[b, 0], V[c, 0]))))
        lo1 = int(np.floor(min(V[a, 1], min(V[b, 1], V[c, 1]))))
        lo2 = int(np.floor(min(V[a, 2], min(V[b, 2], V[c, 2]))))
        hi0 = int(np.ceil(max(V[a, 0], max(V[b, 0], V[c, 0]))))
        hi1 = int(np.ceil(max(V[a, 1], max(V[b, 1], V[c, 1]))))
        hi2 = int(np.ceil(max(V[a, 2], max(V[b, 2], V[c, 2]))))
        if (hi0 - lo0 + 1) * (hi1 - lo1 + 1) * (hi2 - lo2 + 1) <= 64:
            for i in range(lo0, hi0 + 1):
                for j in range(lo1, hi1 + 1):
                    for k in range(lo2, hi2 + 1):
                        out, m = _seed_point(i, j, k, n, V, F, f, flat, tflat, out, m, band)
            continue
        e0 = np.sqrt((V[b, 0] - V[a, 0]) ** 2 + (V[b, 1] - V[a, 1]) ** 2 + (V[b, 2] - V[a, 2]) ** 2)
        e1 = np.sqrt((V[c, 0] - V[a, 0]) ** 2 + (V[c, 1] - V[a, 1]) ** 2 + (V[c, 2] - V[a, 2]) ** 2)
        e2 = np.sqrt((V[c, 0] - V[b, 0]) ** 2 + (V[c, 1] - V[b, 1]) ** 2 + (V[c, 2] - V[b, 2]) ** 2)
        steps = int(np.ceil(max(e0, max(e1, e2)) / 0.9))
        for sa in range(steps + 1):
            for sb in range(steps + 1 - sa):
                wa = sa / steps
                wb = sb / steps
                x = V[a, 0] + wa * (V[b, 0] - V[a, 0]) + wb * (V[c, 0] - V[a, 0])
                y = V[a, 1] + wa * (V[b, 1] - V[a, 1]) + wb * (V[c, 1] - V[a, 1])
                z = V[a, 2] + wa * (V[b, 2] - V[a, 2]) + wb * (V[c, 2] - V[a, 2])
                # the nearest grid point only: at < 1 voxel spacing these are connected, and the
                # propagation that follows gives their neighbours the same face's exact distance
                out, m = _seed_point(int(np.rint(x)), int(np.rint(y)), int(np.rint(z)), n, V, F, f, flat, tflat, out, m, band)
    return out[:m]


@njit(cache=True)
def propagate_band(V, F, dist, tri, frontier, band):
    """Grow the band outward: each point offers its nearest face to its 6 neighbours, which keep it if it is
    nearer than what they have (closest-feature propagation, as in a closest-point transform). Distances are
    exact to the offered face, so the only error is an occasionally suboptimal face choice. Points farther
    than `band` (voxels) are not entered. Returns the flat indices of every band point."""
    n = dist.shape[0]
    flat = dist.reshape(-1)
    tflat = tri.reshape(-1)
    queued = np.zeros(flat.shape[0], np.uint8)
    allpts = np.empty(max(16, frontier.shape[0] * 2), np.int64)
    na = 0
    for t in range(frontier.shape[0]):
        allpts, na = _push(allpts, na, frontier[t])
    cur = frontier.copy()
    nxt = np.empty(max(16, cur.shape[0]), np.int64)
    while cur.shape[0] > 0:
        m = 0
        for t in range(cur.shape[0]):
            idx = cur[t]
            queued[idx] = 0
            f = tflat[idx] - 1
            k = idx % n
            j = (idx // n) % n
            i = idx // (n * n)
            for s in range(6):
                ii, jj, kk = i, j, k
                if s == 0:
                    ii -= 1
                elif s == 1:
                    ii += 1
                elif s == 2:
                    jj -= 1
                elif s == 3:
                    jj += 1
                elif s == 4:
                    kk -= 1
                else:
                    kk += 1
                if ii < 0 or jj < 0 or kk < 0 or ii >= n or jj >= n or kk >= n:
                    continue
                q = (ii * n + jj) * n + kk
                if tflat[q] == f + 1:
                    continue
                d = max(_face_dist(np.float32(ii), np.float32(jj), np.float32(kk), V, F, f), np.float32(1e-6))
                old = flat[q]
                if (old == 0.0 or d < old) and d <= band:
                    if old == 0.0:
                        allpts, na = _push(allpts, na, q)
                    flat[q] = d
                    tflat[q] = f + 1
                    if queued[q] == 0:
                        queued[q] = 1
                        nxt, m = _push(nxt, m, q)
        cur = nxt[:m].copy()
    return allpts[:na]


# ----------------------------------------------------------------------------- outside flood fill
@njit(cache=True)
def flood_outside(dist, band_idx, thr, B, state):
    """Returns (state, has, cout). state per point: 0 = enclosed, 1 = blocked (dist < thr), 2 = outside
    (reached from the grid boundary through points with dist >= thr, 6-connected). has[block] = the B^3
    block holds a blocked point; cout[block] = the block is empty and flooded at block level (its points
    are outside but not painted in `state`).

    Two levels to stay fast at 512^3: empty blocks are flooded as a whole on the coarse grid, then a
    point-level flood runs from them into the blocks that hold surface."""
    n = dist.shape[0]
    nb = (n + B - 1) // B
    sflat = state.reshape(-1)
    dflat = dist.reshape(-1)
    has = np.zeros((nb, nb, nb), np.uint8)
    for t in range(band_idx.shape[0]):
        idx = band_idx[t]
        if dflat[idx] < thr:
            sflat[idx] = 1
            k = idx % n
            j = (idx // n) % n
            i = idx // (n * n)
            has[i // B, j // B, k // B] = 1
    cout = np.zeros((nb, nb, nb), np.uint8)
    stack = np.empty(nb * nb * nb, np.int64)
    sp = 0
    for a in range(nb):
        for b in range(nb):
            for c in range(nb):
                if (a == 0 or b == 0 or c == 0 or a == nb - 1 or b == nb - 1 or c == nb - 1) and has[a, b, c] == 0:
                    cout[a, b, c] = 1
                    stack[sp] = (a * nb + b) * nb + c
                    sp += 1
    while sp > 0:
        sp -= 1
        idx = stack[sp]
        c = idx % nb
        b = (idx // nb) % nb
        a = idx // (nb * nb)
        for s in range(6):
            aa, bb, cc = a, b, c
            if s == 0:
                aa -= 1
            elif s == 1:
                aa += 1
            elif s == 2:
                bb -= 1
            elif s == 3:
                bb += 1
            elif s == 4:
                cc -= 1
            else:
                cc += 1
            if aa < 0 or bb < 0 or cc < 0 or aa >= nb or bb >= nb or cc >= nb:
                continue
            if cout[aa, bb, cc] == 0 and has[aa, bb, cc] == 0:
                cout[aa, bb, cc] = 1
                stack[sp] = (aa * nb + bb) * nb + cc
                sp += 1
    # paint the outside empty blocks next to surface blocks point by point: from here on, for any point
    # within one block of the surface, "outside" is simply state == 2 (no block lookups in the hot loops)
    for a in range(nb):
        for b in range(nb):
            for c in range(nb):
                if cout[a, b, c] == 0:
                    continue
                touch = False
                for x in range(max(a - 1, 0), min(a + 2, nb)):
                    for y in range(max(b - 1, 0), min(b + 2, nb)):
                        for z in range(max(c - 1, 0), min(c + 2, nb)):
                            if has[x, y, z]:
                                touch = True
                if touch:
                    state[a * B : min(n, a * B + B), b * B : min(n, b * B + B), c * B : min(n, c * B + B)] = 2
    # seed the point flood: free points of surface blocks on the grid boundary or next to an outside point
    pstack = np.empty(1 << 20, np.int64)
    sp = 0
    for a in range(nb):
        for b in range(nb):
            for c in range(nb):
                if has[a, b, c] == 0:
                    continue
                for i in range(a * B, min(n, a * B + B)):
                    for j in range(b * B, min(n, b * B + B)):
                        for k in range(c * B, min(n, c * B + B)):
                            if state[i, j, k] != 0:
                                continue
                            touch = i == 0 or j == 0 or k == 0 or i == n - 1 or j == n - 1 or k == n - 1
                            if not touch:
                                touch = (
                                    state[i - 1, j, k] == 2
                                    or state[i + 1, j, k] == 2
                                    or state[i, j - 1, k] == 2
                                    or state[i, j + 1, k] == 2
                                    or state[i, j, k - 1] == 2
                                    or state[i, j, k + 1] == 2
                                )
                            if touch:
                                state[i, j, k] = 2
                                pstack, sp = _push(pstack, sp, (i * n + j) * n + k)
    while sp > 0:
        sp -= 1
        idx = pstack[sp]
        k = idx % n
        j = (idx // n) % n
        i = idx // (n * n)
        for s in range(6):
            ii, jj, kk = i, j, k
            if s == 0:
                ii -= 1
            elif s == 1:
                ii += 1
            elif s == 2:
                jj -= 1
            elif s == 3:
                jj += 1
            elif s == 4:
                kk -= 1
            else:
                kk += 1
            if ii < 0 or jj < 0 or kk < 0 or ii >= n or jj >= n or kk >= n:
                continue
            if state[ii, jj, kk] == 0:  # painted blocks are 2; unpainted outside blocks are unreachable
                state[ii, jj, kk] = 2
                pstack, sp = _push(pstack, sp, (ii * n + jj) * n + kk)
    return has, cout


@njit(cache=True, inline="always")
def _nb(idx, s, n):
    """Flat index of the s-th 6-neighbour of idx, or -1 outside the grid."""
    k = idx % n
    j = (idx // n) % n
    i = idx // (n * n)
    if s == 0:
        return idx - n * n if i > 0 else -1
    if s == 1:
        return idx + n * n if i < n - 1 else -1
    if s == 2:
        return idx - n if j > 0 else -1
    if s == 3:
        return idx + n if j < n - 1 else -1
    if s == 4:
        return idx - 1 if k > 0 else -1
    return idx + 1 if k < n - 1 else -1


@njit(cache=True, inline="always")
def _is_out_flat(sflat, has, cout, B, n, idx):
    if sflat[idx] == 2:
        return True
    k = idx % n
    j = (idx // n) % n
    i = idx // (n * n)
    bi, bj, bk = i // B, j // B, k // B
    return has[bi, bj, bk] == 0 and cout[bi, bj, bk] == 1


@njit(cache=True)
def grow_outside(state, dist, has, cout, B, level, steps, band_idx):
    """Hole closing, second half: the flood ran against a thicker wall (dist < level + steps); give the
    outside back the `steps` voxel layers it could not enter, wherever dist >= level (unset dist = far).
    A hole narrower than about 2 * (level + steps) voxels stays closed, capped `steps` voxels deep.
    Layer 1 can only be band points; each next layer is a neighbour of the last one."""
    n = state.shape[0]
    sflat = state.reshape(-1)
    dflat = dist.reshape(-1)
    cand = band_idx
    for _ in range(steps):
        grow = np.empty(1 << 16, np.int64)
        m = 0
        for t in range(cand.shape[0]):
            idx = cand[t]
            d = dflat[idx]
            if (d != 0.0 and d < level) or sflat[idx] == 2:
                continue
            for s in range(6):
                q = _nb(idx, s, n)
                if q >= 0 and sflat[q] == 2:
                    grow, m = _push(grow, m, idx)
                    break
        nxt = np.empty(max(16, 6 * m), np.int64)
        m2 = 0
        for t in range(m):
            sflat[grow[t]] = 2
        for t in range(m):
            for s in range(6):
                q = _nb(grow[t], s, n)
                if q >= 0 and sflat[q] != 2:
                    nxt, m2 = _push(nxt, m2, q)
        cand = nxt[:m2]


@njit(cache=True, inline="always")
def _val(dflat, sflat, level, idx):
    """The contour field at a point within a block of the surface (voxel units, negative inside): outside
    points dist - level (> 0; +1e4 where far), blocked points dist - level (< 0), other points -1. Never
    exactly 0, so marching cubes makes no zero-area faces."""
    d = dflat[idx]
    if sflat[idx] == 2:
        if d == 0.0:
            return np.float32(1e4)
        return max(d - level, np.float32(1e-4))
    if d != 0.0 and d < level:
        return min(d - level, np.float32(-1e-4))
    return np.float32(-1.0)


@njit(cache=True)
def contour_field(dist, state, has, cout, B, level, band_idx, field, mask):
    """Write the contour field into `field` at the corners of every cell whose corners change sign, and
    mark those cells in `mask` at their max corner (skimage's Lewiner loop tests the mask there; marking
    the min corner drops cubes and opens the surface). `field` is garbage elsewhere, which is fine: masked
    marching cubes reads the values of masked cells only. Every sign change is on a grid edge with a band
    point at one end, so the band points are the only place to look. Returns the number of cells."""
    n = dist.shape[0]
    sflat = state.reshape(-1)
    dflat = dist.reshape(-1)
    fflat = field.reshape(-1)
    mflat = mask.reshape(-1)
    cells = np.empty(1 << 16, np.int64)
    m = 0
    for t in range(band_idx.shape[0]):
        p = band_idx[t]
        vp = _val(dflat, sflat, level, p)
        for s in range(6):
            q = _nb(p, s, n)
            if q < 0 or (s % 2 == 0 and dflat[q] != 0.0):
                continue  # an edge between two band points is looked at from its lower end only
            vq = _val(dflat, sflat, level, q)
            if (vp > 0) == (vq > 0):
                continue
            lo = min(p, q)  # the edge runs from lo along one axis; the 4 cells around it share it
            k = lo % n
            j = (lo // n) % n
            i = lo // (n * n)
            axis = s // 2  # 0: i, 1: j, 2: k
            for u in range(2):
                for w in range(2):
                    ci, cj, ck = i, j, k
                    if axis == 0:
                        cj -= u
                        ck -= w
                    elif axis == 1:
                        ci -= u
                        ck -= w
                    else:
                        ci -= u
                        cj -= w
                    if ci < 0 or cj < 0 or ck < 0 or ci >= n - 1 or cj >= n - 1 or ck >= n - 1:
                        continue
                    top = ((ci + 1) * n + (cj + 1)) * n + (ck + 1)
                    if not mflat[top]:
                        mflat[top] = True
                        cells, m = _push(cells, m, (ci * n + cj) * n + ck)
    for t in range(m):
        c = cells[t]
        for a in range(2):
            for b in range(2):
                for e in range(2):
                    idx = c + (a * n + b) * n + e
                    fflat[idx] = _val(dflat, sflat, level, idx)
    return m


# ----------------------------------------------------------------------------- mesh checks
@njit(cache=True)
def count_parts(F, nv):
    """Connected components of the faces (union-find over vertices); unreferenced vertices do not count."""
    parent = np.arange(nv)
    for f in range(F.shape[0]):
        for s in range(2):
            a, b = F[f, s], F[f, s + 1]
            while parent[a] != a:
                parent[a] = parent[parent[a]]
                a = parent[a]
            while parent[b] != b:
                parent[b] = parent[parent[b]]
                b = parent[b]
            if a != b:
                parent[max(a, b)] = min(a, b)
    used = np.zeros(nv, np.uint8)
    for f in range(F.shape[0]):
        for s in range(3):
            used[F[f, s]] = 1
    count = 0
    for v in range(nv):
        if used[v] and parent[v] == v:
            count += 1
    return count


# ----------------------------------------------------------------------------- point queries
@njit(cache=True)
def field_sign(dist, state, has, cout, B, level, P):
    """Inside (-1) / outside (+1) for points P (voxel units): sign of the trilinear interpolation of the
    contour field (evaluated on the fly from the distance band and the flood state)."""
    n = dist.shape[0]
    sflat = state.reshape(-1)
    dflat = dist.reshape(-1)
    out = np.empty(P.shape[0], np.int8)
    for t in range(P.shape[0]):
        x = min(max(P[t, 0], 0.0), n - 1.000001)
        y = min(max(P[t, 1], 0.0), n - 1.000001)
        z = min(max(P[t, 2], 0.0), n - 1.000001)
        i, j, k = int(x), int(y), int(z)
        fx, fy, fz = x - i, y - j, z - k
        acc = 0.0
        for a in range(2):
            for b in range(2):
                for c in range(2):
                    w = (fx if a else 1 - fx) * (fy if b else 1 - fy) * (fz if c else 1 - fz)
                    # far values (1e4) would swamp the interpolation: clip to a few voxels
                    q = ((i + a) * n + (j + b)) * n + (k + c)
                    if _is_out_flat(sflat, has, cout, B, n, q):
                        v = max(dflat[q] - level, np.float32(1e-4)) if dflat[q] != 0.0 else np.float32(1e4)
                    else:
                        v = _val(dflat, sflat, level, q)
                    acc += w * min(v, np.float32(4.0))
        out[t] = 1 if acc > 0 else -1
    return out


# ----------------------------------------------------------------------------- rasteriser
@njit(cache=True)
def rasterize(xy, invz, F, H, W, face_id, zbuf):
    """Z-buffer rasteriser. xy: (V,2) pixel coordinates, invz: (V,) 1/depth (linear in screen space).
    Fills face_id (H,W) int32 (-1 = background) and zbuf (H,W) float32 (largest 1/z wins). Both windings
    are drawn (sculpts are not reliably oriented); pixel centres at +0.5; shared edges are drawn by both
    faces, so no cracks."""
    for f in range(F.shape[0]):
        a, b, c = F[f, 0], F[f, 1], F[f, 2]
        if invz[a] <= 0.0 or invz[b] <= 0.0 or invz[c] <= 0.0:
            continue  # behind the camera
        ax, ay = xy[a, 0], xy[a, 1]
        bx, by = xy[b, 0], xy[b, 1]
        cx, cy = xy[c, 0], xy[c, 1]
        area = (bx - ax) * (cy - ay) - (by - ay) * (cx - ax)
        if area == 0.0:
            continue
        x0 = max(int(np.ceil(min(ax, min(bx, cx)) - 0.5)), 0)
        x1 = min(int(np.floor(max(ax, max(bx, cx)) - 0.5)), W - 1)
        y0 = max(int(np.ceil(min(ay, min(by, cy)) - 0.5)), 0)
        y1 = min(int(np.floor(max(ay, max(by, cy)) - 0.5)), H - 1)
        if x0 > x1 or y0 > y1:
            continue
        inv_area = 1.0 / area
        for y in range(y0, y1 + 1):
            py = y + 0.5
            for x in range(x0, x1 + 1):
                px = x + 0.5
                w0 = ((bx - px) * (cy - py) - (by - py) * (cx - px)) * inv_area
                w1 = ((cx - px) * (ay - py) - (cy - py) * (ax - px)) * inv_area
                w2 = 1.0 - w0 - w1
                if w0 < 0.0 or w1 < 0.0 or w2 < 0.0:
                    continue
                iz = w0 * invz[a] + w1 * invz[b] + w2 * invz[c]
                if iz > zbuf[y, x]:
                    zbuf[y, x] = iz
                    face_id[y, x] = f


# ----------------------------------------------------------------------------- distance to the watertight mesh
@njit(cache=True)
def vertex_cpt(Vc, nc, band):
    """Nearest mesh vertex for every point of a coarse grid (nc^3, vertex coordinates Vc in coarse units)
    within `band` coarse cells of the surface: seeded at the corners of each vertex's cell, then grown by
    closest-point propagation over 26 neighbours. -1 where nothing is within the band."""
    near = np.full(nc * nc * nc, -1, np.int32)
    dist = np.full(nc * nc * nc, np.float32(np.inf), np.float32)
    queued = np.zeros(nc * nc * nc, np.uint8)
    cur = np.empty(16, np.int64)
    m = 0
    for v in range(Vc.shape[0]):
        x, y, z = Vc[v, 0], Vc[v, 1], Vc[v, 2]
        i0, j0, k0 = int(x), int(y), int(z)
        for a in range(2):
            for b in range(2):
                for c in range(2):
                    i, j, k = min(i0 + a, nc - 1), min(j0 + b, nc - 1), min(k0 + c, nc - 1)
                    d = np.sqrt((i - x) ** 2 + (j - y) ** 2 + (k - z) ** 2)
                    idx = (i * nc + j) * nc + k
                    if d < dist[idx]:
                        dist[idx] = d
                        near[idx] = v
                        if queued[idx] == 0:
                            queued[idx] = 1
                            cur, m = _push(cur, m, idx)
    cur = cur[:m].copy()
    nxt = np.empty(16, np.int64)
    while cur.shape[0] > 0:
        m = 0
        for t in range(cur.shape[0]):
            idx = cur[t]
            queued[idx] = 0
            v = near[idx]
            x, y, z = Vc[v, 0], Vc[v, 1], Vc[v, 2]
            k = idx % nc
            j = (idx // nc) % nc
            i = idx // (nc * nc)
            for a in range(-1, 2):
                for b in range(-1, 2):
                    for c in range(-1, 2):
                        ii, jj, kk = i + a, j + b, k + c
                        if ii < 0 or jj < 0 or kk < 0 or ii >= nc or jj >= nc or kk >= nc:
                            continue
                        q = (ii * nc + jj) * nc + kk
                        if near[q] == v:
                            continue
                        d = np.float32(np.sqrt((ii - x) ** 2 + (jj - y) ** 2 + (kk - z) ** 2))
                        if d < dist[q] and d <= band:
                            dist[q] = d
                            near[q] = v
                            if queued[q] == 0:
                                queued[q] = 1
                                nxt, m = _push(nxt, m, q)
        cur = nxt[:m].copy()
    return near


@njit(cache=True)
def surface_distance(P, scale_c, V, F, ring_ptr, ring_faces, near, nc, cap):
    """Unsigned distance (units of V) from points P (units of V) to the mesh, capped at `cap`.
    Starts: the two nearest of the vertices nearest to the 8 coarse-grid corners around the point (coarse
    = V units / scale_c); from each, greedy descent over mesh neighbours to a locally nearest vertex; then
    the exact distance to the faces around the vertices found."""
    out = np.empty(P.shape[0], np.float32)
    for t in range(P.shape[0]):
        px, py, pz = P[t, 0], P[t, 1], P[t, 2]
        x = min(max(px / scale_c, 0.0), nc - 1.000001)
        y = min(max(py / scale_c, 0.0), nc - 1.000001)
        z = min(max(pz / scale_c, 0.0), nc - 1.000001)
        i0, j0, k0 = int(x), int(y), int(z)
        # the two nearest distinct corner candidates, each followed by a descent (one start can end on the
        # wrong side of a thin gap: two cost little and catch most of those)
        v1 = -1
        v2 = -1
        d1 = np.inf
        d2 = np.inf
        for a in range(2):
            for b in range(2):
                for c in range(2):
                    w = near[((i0 + a) * nc + (j0 + b)) * nc + (k0 + c)]
                    if w < 0 or w == v1 or w == v2:
                        continue
                    dw = (V[w, 0] - px) ** 2 + (V[w, 1] - py) ** 2 + (V[w, 2] - pz) ** 2
                    if dw < d1:
                        v2, d2 = v1, d1
                        v1, d1 = w, dw
                    elif dw < d2:
                        v2, d2 = w, dw
        best = np.float32(cap)
        for start in range(2):
            v = v1 if start == 0 else v2
            dv = d1 if start == 0 else d2
            if v < 0:
                continue
            moved = True
            steps = 0
            while moved and steps < 256:
                moved = False
                steps += 1
                for r in range(ring_ptr[v], ring_ptr[v + 1]):
                    f = ring_faces[r]
                    for s in range(3):
                        w = F[f, s]
                        dw = (V[w, 0] - px) ** 2 + (V[w, 1] - py) ** 2 + (V[w, 2] - pz) ** 2
                        if dw < dv:
                            dv = dw
                            v = w
                            moved = True
            for r in range(ring_ptr[v], ring_ptr[v + 1]):
                d = _face_dist(px, py, pz, V, F, ring_faces[r])
                if d < best:
                    best = d
        out[t] = best
    return out
