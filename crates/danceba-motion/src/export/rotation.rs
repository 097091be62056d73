//! Small f64 rotation helpers for the skeleton exporters: 3×3 matrices, quaternions, the
//! shortest-arc rotation, Horn's best-fit rotation and Euler angles.

// Matrix code reads best with explicit indices.
#![allow(clippy::needless_range_loop)]

pub type M3 = [[f64; 3]; 3];
pub type V3 = [f64; 3];

pub const IDENTITY: M3 = [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]];

pub fn mul(a: &M3, b: &M3) -> M3 {
    let mut r = [[0.0; 3]; 3];
    for (i, row) in r.iter_mut().enumerate() {
        for (j, v) in row.iter_mut().enumerate() {
            *v = a[i][0] * b[0][j] + a[i][1] * b[1][j] + a[i][2] * b[2][j];
        }
    }
    r
}

pub fn transpose(a: &M3) -> M3 {
    [
        [a[0][0], a[1][0], a[2][0]],
        [a[0][1], a[1][1], a[2][1]],
        [a[0][2], a[1][2], a[2][2]],
    ]
}

pub fn apply(a: &M3, v: V3) -> V3 {
    [
        a[0][0] * v[0] + a[0][1] * v[1] + a[0][2] * v[2],
        a[1][0] * v[0] + a[1][1] * v[1] + a[1][2] * v[2],
        a[2][0] * v[0] + a[2][1] * v[1] + a[2][2] * v[2],
    ]
}

pub fn sub(a: V3, b: V3) -> V3 {
    [a[0] - b[0], a[1] - b[1], a[2] - b[2]]
}

pub fn add(a: V3, b: V3) -> V3 {
    [a[0] + b[0], a[1] + b[1], a[2] + b[2]]
}

pub fn scale(a: V3, s: f64) -> V3 {
    [a[0] * s, a[1] * s, a[2] * s]
}

pub fn dot(a: V3, b: V3) -> f64 {
    a[0] * b[0] + a[1] * b[1] + a[2] * b[2]
}

pub fn cross(a: V3, b: V3) -> V3 {
    [
        a[1] * b[2] - a[2] * b[1],
        a[2] * b[0] - a[0] * b[2],
        a[0] * b[1] - a[1] * b[0],
    ]
}

pub fn norm(a: V3) -> f64 {
    dot(a, a).sqrt()
}

/// Rotation matrix of a unit quaternion `[w, x, y, z]`.
pub fn quat_to_matrix(q: [f64; 4]) -> M3 {
    let n = (q[0] * q[0] + q[1] * q[1] + q[2] * q[2] + q[3] * q[3]).sqrt();
    let [w, x, y, z] = if n > 0.0 {
        [q[0] / n, q[1] / n, q[2] / n, q[3] / n]
    } else {
        [1.0, 0.0, 0.0, 0.0]
    };
    [
        [
            1.0 - 2.0 * (y * y + z * z),
            2.0 * (x * y - w * z),
            2.0 * (x * z + w * y),
        ],
        [
            2.0 * (x * y + w * z),
            1.0 - 2.0 * (x * x + z * z),
            2.0 * (y * z - w * x),
        ],
        [
            2.0 * (x * z - w * y),
            2.0 * (y * z + w * x),
            1.0 - 2.0 * (x * x + y * y),
        ],
    ]
}

/// Unit quaternion `[w, x, y, z]` of a rotation matrix (Shepperd's method), with `w ≥ 0`.
pub fn matrix_to_quat(m: &M3) -> [f64; 4] {
    let tr = m[0][0] + m[1][1] + m[2][2];
    let q = if tr > 0.0 {
        let s = (tr + 1.0).sqrt() * 2.0;
        [
            0.25 * s,
            (m[2][1] - m[1][2]) / s,
            (m[0][2] - m[2][0]) / s,
            (m[1][0] - m[0][1]) / s,
        ]
    } else if m[0][0] > m[1][1] && m[0][0] > m[2][2] {
        let s = (1.0 + m[0][0] - m[1][1] - m[2][2]).sqrt() * 2.0;
        [
            (m[2][1] - m[1][2]) / s,
            0.25 * s,
            (m[0][1] + m[1][0]) / s,
            (m[0][2] + m[2][0]) / s,
        ]
    } else if m[1][1] > m[2][2] {
        let s = (1.0 + m[1][1] - m[0][0] - m[2][2]).sqrt() * 2.0;
        [
            (m[0][2] - m[2][0]) / s,
            (m[0][1] + m[1][0]) / s,
            0.25 * s,
            (m[1][2] + m[2][1]) / s,
        ]
    } else {
        let s = (1.0 + m[2][2] - m[0][0] - m[1][1]).sqrt() * 2.0;
        [
            (m[1][0] - m[0][1]) / s,
            (m[0][2] + m[2][0]) / s,
            (m[1][2] + m[2][1]) / s,
            0.25 * s,
        ]
    };
    let n = (q[0] * q[0] + q[1] * q[1] + q[2] * q[2] + q[3] * q[3]).sqrt();
    let q = [q[0] / n, q[1] / n, q[2] / n, q[3] / n];
    if q[0] < 0.0 {
        [-q[0], -q[1], -q[2], -q[3]]
    } else {
        q
    }
}

/// Rotation about a unit `axis` by `angle` radians.
pub fn axis_angle(axis: V3, angle: f64) -> M3 {
    let (s, c) = (angle * 0.5).sin_cos();
    quat_to_matrix([c, axis[0] * s, axis[1] * s, axis[2] * s])
}

/// The shortest-arc rotation taking the direction of `a` to the direction of `b` (no twist about
/// the bone). For opposite directions the axis is `a × e`, with `e` the coordinate axis least
/// aligned with `a`; for a zero-length input the identity.
pub fn shortest_arc(a: V3, b: V3) -> M3 {
    let (na, nb) = (norm(a), norm(b));
    if na < 1e-12 || nb < 1e-12 {
        return IDENTITY;
    }
    let (a, b) = (scale(a, 1.0 / na), scale(b, 1.0 / nb));
    let c = dot(a, b);
    if c < -1.0 + 1e-12 {
        let e = if a[0].abs() <= a[1].abs() && a[0].abs() <= a[2].abs() {
            [1.0, 0.0, 0.0]
        } else if a[1].abs() <= a[2].abs() {
            [0.0, 1.0, 0.0]
        } else {
            [0.0, 0.0, 1.0]
        };
        let axis = cross(a, e);
        return axis_angle(scale(axis, 1.0 / norm(axis)), std::f64::consts::PI);
    }
    // q = [1 + a·b, a × b], normalised.
    let x = cross(a, b);
    quat_to_matrix([1.0 + c, x[0], x[1], x[2]])
}

/// The rotation `R` minimising `Σ |R·a_i − b_i|²` (Horn's quaternion method). With one pair it
/// degenerates to [`shortest_arc`]'s direction alignment, so callers use that instead.
pub fn best_fit_rotation(pairs: &[(V3, V3)]) -> M3 {
    let mut s = [[0.0f64; 3]; 3]; // s[i][j] = Σ a_i b_j
    for (a, b) in pairs {
        for i in 0..3 {
            for j in 0..3 {
                s[i][j] += a[i] * b[j];
            }
        }
    }
    let (sxx, sxy, sxz) = (s[0][0], s[0][1], s[0][2]);
    let (syx, syy, syz) = (s[1][0], s[1][1], s[1][2]);
    let (szx, szy, szz) = (s[2][0], s[2][1], s[2][2]);
    let n = [
        [sxx + syy + szz, syz - szy, szx - sxz, sxy - syx],
        [syz - szy, sxx - syy - szz, sxy + syx, szx + sxz],
        [szx - sxz, sxy + syx, -sxx + syy - szz, syz + szy],
        [sxy - syx, szx + sxz, syz + szy, -sxx - syy + szz],
    ];
    let (vals, vecs) = jacobi4(n);
    let mut best = 0;
    for i in 1..4 {
        if vals[i] > vals[best] {
            best = i;
        }
    }
    quat_to_matrix([vecs[0][best], vecs[1][best], vecs[2][best], vecs[3][best]])
}

/// Eigen-decomposition of a symmetric 4×4 matrix by cyclic Jacobi rotations: (eigenvalues,
/// eigenvectors as columns).
fn jacobi4(mut a: [[f64; 4]; 4]) -> ([f64; 4], [[f64; 4]; 4]) {
    let mut v = [[0.0; 4]; 4];
    for (i, row) in v.iter_mut().enumerate() {
        row[i] = 1.0;
    }
    for _sweep in 0..60 {
        let mut off = 0.0;
        for i in 0..4 {
            for j in (i + 1)..4 {
                off += a[i][j] * a[i][j];
            }
        }
        if off < 1e-30 {
            break;
        }
        for p in 0..4 {
            for q in (p + 1)..4 {
                if a[p][q].abs() < 1e-300 {
                    continue;
                }
                let theta = (a[q][q] - a[p][p]) / (2.0 * a[p][q]);
                let t = theta.signum() / (theta.abs() + (theta * theta + 1.0).sqrt());
                let t = if theta == 0.0 { 1.0 } else { t };
                let c = 1.0 / (t * t + 1.0).sqrt();
                let s = t * c;
                for k in 0..4 {
                    let (akp, akq) = (a[k][p], a[k][q]);
                    a[k][p] = c * akp - s * akq;
                    a[k][q] = s * akp + c * akq;
                }
                for k in 0..4 {
                    let (apk, aqk) = (a[p][k], a[q][k]);
                    a[p][k] = c * apk - s * aqk;
                    a[q][k] = s * apk + c * aqk;
                }
                for row in v.iter_mut() {
                    let (vkp, vkq) = (row[p], row[q]);
                    row[p] = c * vkp - s * vkq;
                    row[q] = s * vkp + c * vkq;
                }
            }
        }
    }
    ([a[0][0], a[1][1], a[2][2], a[3][3]], v)
}

/// Euler angles (radians) `[z, x, y]` with `M = Rz(z)·Rx(x)·Ry(y)`, the BVH channel order
/// `Zrotation Xrotation Yrotation`.
pub fn matrix_to_euler_zxy(m: &M3) -> [f64; 3] {
    let sx = m[2][1].clamp(-1.0, 1.0);
    let x = sx.asin();
    if sx.abs() < 1.0 - 1e-9 {
        let y = (-m[2][0]).atan2(m[2][2]);
        let z = (-m[0][1]).atan2(m[1][1]);
        [z, x, y]
    } else {
        // Gimbal lock: only z ± y is defined; put it all in z.
        let z = m[1][0].atan2(m[0][0]);
        [z, x, 0.0]
    }
}

/// `Rz(z)·Rx(x)·Ry(y)`.
pub fn euler_zxy_to_matrix(e: [f64; 3]) -> M3 {
    let (sz, cz) = e[0].sin_cos();
    let (sx, cx) = e[1].sin_cos();
    let (sy, cy) = e[2].sin_cos();
    let rz = [[cz, -sz, 0.0], [sz, cz, 0.0], [0.0, 0.0, 1.0]];
    let rx = [[1.0, 0.0, 0.0], [0.0, cx, -sx], [0.0, sx, cx]];
    let ry = [[cy, 0.0, sy], [0.0, 1.0, 0.0], [-sy, 0.0, cy]];
    mul(&rz, &mul(&rx, &ry))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: &M3, b: &M3, tol: f64) -> bool {
        (0..3).all(|i| (0..3).all(|j| (a[i][j] - b[i][j]).abs() < tol))
    }

    #[test]
    fn euler_round_trip() {
        for k in 0..200 {
            let f = k as f64;
            let e = [
                (f * 0.37).sin() * 3.0,
                (f * 0.11).cos() * 1.5,
                (f * 0.73).sin() * 3.1,
            ];
            let m = euler_zxy_to_matrix(e);
            let back = euler_zxy_to_matrix(matrix_to_euler_zxy(&m));
            assert!(close(&m, &back, 1e-9), "{e:?}");
        }
        let m = euler_zxy_to_matrix([0.3, std::f64::consts::FRAC_PI_2, 0.2]);
        assert!(close(
            &m,
            &euler_zxy_to_matrix(matrix_to_euler_zxy(&m)),
            1e-6
        ));
    }

    #[test]
    fn best_fit_recovers_a_rotation() {
        let r = axis_angle([0.48, 0.6, 0.64], 2.5);
        let a = [[0.1, 0.2, -0.3], [-0.2, 0.05, 0.1], [0.0, 0.3, 0.02]];
        let pairs: Vec<(V3, V3)> = a.iter().map(|&v| (v, apply(&r, v))).collect();
        assert!(close(&best_fit_rotation(&pairs), &r, 1e-9));
        let q = matrix_to_quat(&r);
        assert!(close(&quat_to_matrix(q), &r, 1e-12));
    }

    #[test]
    fn shortest_arc_aligns_including_opposite() {
        for (a, b) in [
            ([0.0, 1.0, 0.0], [0.3, -0.2, 0.9]),
            ([0.0, 1.0, 0.0], [0.0, -2.0, 0.0]),
            ([1.0, 0.0, 0.0], [1.0, 0.0, 0.0]),
        ] {
            let r = shortest_arc(a, b);
            let got = apply(&r, a);
            let nb = norm(b);
            for i in 0..3 {
                assert!((got[i] - b[i] / nb * norm(a)).abs() < 1e-12);
            }
        }
    }
}
