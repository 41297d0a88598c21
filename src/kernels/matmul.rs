//! The one matrix-multiply entry point. Everything heavy in lowrank goes through here, on the
//! `gemm` crate's f32 kernels and the rayon pool (see DESIGN.md for why this crate).

/// `c[m×n] = beta·c + alpha·op(a)·op(b)` with row-major storage, where `op(a)` is `a` (`[m×k]`) or,
/// with `a_t`, the transpose of `a` stored as `[k×m]`; likewise `op(b)` is `[k×n]` or, with `b_t`,
/// the transpose of `b` stored as `[n×k]`. `beta` is 0 (overwrite) or 1 (accumulate).
#[allow(clippy::too_many_arguments)]
pub fn matmul(c: &mut [f32], a: &[f32], a_t: bool, b: &[f32], b_t: bool, m: usize, n: usize, k: usize, alpha: f32, accumulate: bool) {
    assert_eq!(c.len(), m * n, "matmul: c has {} elements, expected {m}×{n}", c.len());
    assert_eq!(a.len(), m * k, "matmul: a has {} elements, expected {m}×{k}", a.len());
    assert_eq!(b.len(), k * n, "matmul: b has {} elements, expected {k}×{n}", b.len());
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            c.fill(0.0);
        }
        return;
    }
    if m <= 4 && !a_t && b_t && n >= 256 {
        // Decoding: a few rows against a weight stored [n×k]. Streaming each weight row once through
        // a dot product per input row is memory-bound, which is the best a GEMV can be.
        return super::gemv::gemv_parallel(super::blocks::Row::F32(b), n, k, a, m, c, alpha, accumulate);
    }
    // Strides in elements: (row stride, column stride) of each operand as the product sees it.
    let (a_rs, a_cs) = if a_t { (1, m as isize) } else { (k as isize, 1) };
    let (b_rs, b_cs) = if b_t { (1, k as isize) } else { (n as isize, 1) };
    let parallelism =
        if m * n * k >= 64 * 64 * 64 && rayon::current_num_threads() > 1 { gemm::Parallelism::Rayon(0) } else { gemm::Parallelism::None };
    // SAFETY: the asserts above guarantee every strided access stays inside the slices, and `c`
    // is borrowed mutably so it cannot alias `a` or `b`.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c.as_mut_ptr(),
            1,
            n as isize,
            accumulate,
            a.as_ptr(),
            a_cs,
            a_rs,
            b.as_ptr(),
            b_cs,
            b_rs,
            1.0,
            alpha,
            false,
            false,
            false,
            parallelism,
        );
    }
}

/// A weight matrix `[rows × cols]` (a linear layer's `[out, in]`) in a form the products take:
/// f32 through `matmul`, or bf16 through `amx::matmul_bf16` — AMX tiles, or AVX512-FP16 or
/// AVX512-BF16 vectors without AMX (construct the bf16 forms only when `amx::products_available()`).
#[derive(Clone, Copy)]
pub enum DenseWeight<'a> {
    F32(&'a [f32]),
    Bf16(&'a [u16]),
    /// bf16 rows written on demand (`amx::RowFill`): a Q8_0/Q4_1 weight dequantized a few rows at
    /// a time as the product packs it into tile panels, never whole.
    Bf16Rows(&'a super::amx::RowFill<'a>),
}

impl DenseWeight<'_> {
    /// `y[m × rows] = x[m × cols] · Wᵀ`.
    pub fn forward(self, y: &mut [f32], x: &[f32], m: usize, rows: usize, cols: usize) {
        match self {
            DenseWeight::F32(w) => matmul(y, x, false, w, true, m, rows, cols, 1.0, false),
            DenseWeight::Bf16(w) => super::amx::matmul_bf16(y, rows, x, cols, m, cols, super::amx::Weight::Nk(w), rows, 1.0, false),
            DenseWeight::Bf16Rows(w) => super::amx::matmul_bf16(y, rows, x, cols, m, cols, super::amx::Weight::NkRows(w), rows, 1.0, false),
        }
    }

    /// `dx[m × cols] (+)= dy[m × rows] · W`: the input gradient of `forward`.
    #[allow(clippy::too_many_arguments)]
    pub fn backward(self, dx: &mut [f32], dy: &[f32], m: usize, rows: usize, cols: usize, accumulate: bool) {
        match self {
            DenseWeight::F32(w) => matmul(dx, dy, false, w, false, m, cols, rows, 1.0, accumulate),
            DenseWeight::Bf16(w) => super::amx::matmul_bf16(dx, cols, dy, rows, m, rows, super::amx::Weight::Kn(w), cols, 1.0, accumulate),
            DenseWeight::Bf16Rows(w) => {
                super::amx::matmul_bf16(dx, cols, dy, rows, m, rows, super::amx::Weight::KnRows(w), cols, 1.0, accumulate)
            }
        }
    }
}

/// Straightforward reference used by tests.
#[cfg(test)]
#[allow(clippy::too_many_arguments)]
pub fn matmul_naive(c: &mut [f32], a: &[f32], a_t: bool, b: &[f32], b_t: bool, m: usize, n: usize, k: usize, alpha: f32, accumulate: bool) {
    for i in 0..m {
        for j in 0..n {
            let mut s = 0.0f64;
            for p in 0..k {
                let av = if a_t { a[p * m + i] } else { a[i * k + p] };
                let bv = if b_t { b[j * k + p] } else { b[p * n + j] };
                s += av as f64 * bv as f64;
            }
            let prev = if accumulate { c[i * n + j] } else { 0.0 };
            c[i * n + j] = prev + alpha * s as f32;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::testutil::randn;
    use crate::rng::Rng;

    #[test]
    fn all_transpose_combinations_match_naive() {
        let mut rng = Rng::new(3);
        for &(m, n, k) in &[(1, 1, 1), (7, 5, 3), (65, 70, 67), (128, 96, 80), (1, 300, 70), (3, 257, 33)] {
            for &(a_t, b_t) in &[(false, false), (true, false), (false, true), (true, true)] {
                for &acc in &[false, true] {
                    let a = randn(&mut rng, m * k, 1.0);
                    let b = randn(&mut rng, k * n, 1.0);
                    let c0 = randn(&mut rng, m * n, 1.0);
                    let (mut c1, mut c2) = (c0.clone(), c0.clone());
                    matmul(&mut c1, &a, a_t, &b, b_t, m, n, k, 0.5, acc);
                    matmul_naive(&mut c2, &a, a_t, &b, b_t, m, n, k, 0.5, acc);
                    let err = c1.iter().zip(&c2).map(|(x, y)| (x - y).abs()).fold(0.0f32, f32::max);
                    assert!(err < 1e-4 * (k as f32).sqrt(), "({m},{n},{k}) a_t={a_t} b_t={b_t} acc={acc}: {err}");
                }
            }
        }
    }
}
