//! Pure numerical kernels on f32 slices. Each kernel that takes part in training has a backward
//! and a finite-difference gradient test (see `gradcheck` in the tests of each file).
//!
//! Layout conventions: matrices are row-major; activations are token-major `[tokens, features]`
//! unless a function says otherwise; attention works on head-major `[batch, heads, seq, head_dim]`.

pub mod activations;
pub mod aligned;
#[cfg(target_arch = "x86_64")]
pub mod amx;
/// Not x86-64: no AMX, so bf16 weights take the f32 path.
#[cfg(not(target_arch = "x86_64"))]
pub mod amx {
    pub fn available() -> bool {
        false
    }

    pub fn products_available() -> bool {
        false
    }

    pub fn products_round_to_bf16() -> bool {
        false
    }

    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub enum ProductUnit {}

    impl ProductUnit {
        pub fn name(self) -> &'static str {
            match self {}
        }
    }

    pub fn product_unit() -> Option<ProductUnit> {
        None
    }

    #[derive(Clone, Copy)]
    pub enum Weight<'a> {
        Nk(&'a [u16]),
        Kn(&'a [u16]),
        NkRows(&'a RowFill<'a>),
        KnRows(&'a RowFill<'a>),
    }

    pub type RowFill<'a> = dyn Fn(usize, &mut [u16]) + Sync + 'a;

    #[allow(clippy::too_many_arguments)]
    pub fn matmul_bf16(_: &mut [f32], _: usize, _: &[f32], _: usize, _: usize, _: usize, _: Weight, _: usize, _: f32, _: bool) {
        unreachable!("matmul_bf16 without AMX: callers check products_available()")
    }
}
pub mod attention;
#[cfg(target_arch = "x86_64")]
mod attention_tiles;
pub mod bf16;
pub mod blocks;
pub mod dot;
#[cfg(target_arch = "x86_64")]
mod dpbf16;
pub mod dropout;
pub mod fastexp;
#[cfg(target_arch = "x86_64")]
pub mod fp16;
pub mod gemv;
pub mod loss;
pub mod matmul;
pub mod norm;
pub mod rope;
#[cfg(target_arch = "x86_64")]
pub mod vnni;

pub use matmul::matmul;

/// Test helpers shared by the kernel tests.
#[cfg(test)]
pub(crate) mod testutil {
    use crate::rng::Rng;

    pub fn randn(rng: &mut Rng, n: usize, scale: f32) -> Vec<f32> {
        (0..n).map(|_| scale * rng.normal()).collect()
    }

    pub fn dot(a: &[f32], b: &[f32]) -> f64 {
        a.iter().zip(b).map(|(&x, &y)| x as f64 * y as f64).sum()
    }

    /// Checks a decode product's output `out[j·m + i]` (weight rows `first..first + n`, activation
    /// rows `0..m`) against the f64 product of the weight's `values` (`[rows × cols]`) and the
    /// activations as the kernel rounds them (`xr`, `[m × cols]`), within 1e-4 relative.
    #[allow(clippy::too_many_arguments)]
    pub fn assert_row_products(out: &[f32], values: &[f32], xr: &[f32], cols: usize, first: usize, n: usize, m: usize, what: &str) {
        for j in 0..n {
            for i in 0..m {
                let want: f64 = (0..cols).map(|k| values[(first + j) * cols + k] as f64 * xr[i * cols + k] as f64).sum();
                let got = out[j * m + i] as f64;
                assert!((got - want).abs() < 1e-4 * (1.0 + want.abs()), "{what} m={m} row {first}+{j} x {i}: {got} vs {want}");
            }
        }
    }

    /// Checks an analytic gradient by a central finite difference along a random direction `d`:
    /// (L(x + eps d) - L(x - eps d)) / 2 eps must equal <grad, d>. `loss` evaluates L at a point.
    pub fn check_directional(name: &str, x: &[f32], grad: &[f32], loss: impl Fn(&[f32]) -> f64, seed: u64) {
        check_directional_eps(name, x, grad, loss, seed, 1e-2)
    }

    /// As `check_directional` with step `eps`: smaller for functions of many inputs, where a
    /// step along every coordinate at once moves the point far.
    pub fn check_directional_eps(name: &str, x: &[f32], grad: &[f32], loss: impl Fn(&[f32]) -> f64, seed: u64, eps: f32) {
        let mut rng = Rng::new(seed);
        let d = randn(&mut rng, x.len(), 1.0);
        let shifted = |sign: f32| -> Vec<f32> { x.iter().zip(&d).map(|(&a, &b)| a + sign * eps * b).collect() };
        let numeric = (loss(&shifted(1.0)) - loss(&shifted(-1.0))) / (2.0 * eps as f64);
        let analytic = dot(grad, &d);
        let err = (numeric - analytic).abs() / analytic.abs().max(1e-3);
        assert!(err < 2e-3, "{name}: finite difference {numeric} vs analytic {analytic} (rel err {err:.2e})");
    }
}
