//! RMSNorm (Llama family): y = w ⊙ x / sqrt(mean(x²) + eps), computed in f32 with an f64 sum.

use super::bf16::AsF32;
use rayon::prelude::*;

/// Normalizes each row of `x` (`[rows, dim]`) into `y`, storing 1/rms per row in `rstd` for backward.
pub fn rmsnorm_forward(x: &[f32], w: &[f32], eps: f32, y: &mut [f32], rstd: &mut [f32]) {
    let _timer = crate::profile::time(crate::profile::Phase::Elementwise);
    let dim = w.len();
    assert_eq!(x.len(), y.len());
    assert_eq!(x.len(), rstd.len() * dim);
    y.par_chunks_mut(dim).zip(x.par_chunks(dim)).zip(rstd.par_iter_mut()).for_each(|((yr, xr), rs)| {
        let ss: f64 = xr.iter().map(|&v| v as f64 * v as f64).sum();
        let r = 1.0 / ((ss / dim as f64) as f32 + eps).sqrt();
        *rs = r;
        for ((yv, &xv), &wv) in yr.iter_mut().zip(xr).zip(w) {
            *yv = wv * (xv * r);
        }
    });
}

/// y = w ⊙ x · rstd with the per-row `rstd` a forward pass stored (recomputes its output); `x`
/// in f32 or bf16.
pub fn rmsnorm_apply<T: AsF32>(x: &[T], w: &[f32], rstd: &[f32], y: &mut [f32]) {
    let _timer = crate::profile::time(crate::profile::Phase::Elementwise);
    let dim = w.len();
    y.par_chunks_mut(dim).zip(x.par_chunks(dim)).zip(rstd.par_iter()).for_each(|((yr, xr), &r)| {
        for ((yv, &xv), &wv) in yr.iter_mut().zip(xr).zip(w) {
            *yv = wv * (xv.as_f32() * r);
        }
    });
}

/// Adds dL/dx to `dx` given dL/dy. The weight is frozen, so no weight gradient is formed.
/// With g = w ⊙ dy: dx = r·g − x·r³·mean(g ⊙ x). `x` in f32 or bf16.
pub fn rmsnorm_backward<T: AsF32>(dy: &[f32], x: &[T], w: &[f32], rstd: &[f32], dx: &mut [f32]) {
    let _timer = crate::profile::time(crate::profile::Phase::Elementwise);
    let dim = w.len();
    assert_eq!(dy.len(), x.len());
    assert_eq!(dx.len(), x.len());
    dx.par_chunks_mut(dim).zip(dy.par_chunks(dim)).zip(x.par_chunks(dim)).zip(rstd.par_iter()).for_each(|(((dxr, dyr), xr), &r)| {
        let gx: f64 = dyr.iter().zip(w).zip(xr).map(|((&d, &wv), &xv)| (d * wv) as f64 * xv.as_f32() as f64).sum();
        let c = (gx / dim as f64) as f32 * r * r * r;
        for (((o, &d), &wv), &xv) in dxr.iter_mut().zip(dyr).zip(w).zip(xr) {
            *o += r * (d * wv) - xv.as_f32() * c;
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::testutil::{check_directional, dot, randn};
    use crate::rng::Rng;

    /// A bf16 input (a kept activation) gives what its f32 value gives.
    #[test]
    fn bf16_inputs_read_as_their_values() {
        use crate::kernels::bf16::{to_bf16, to_f32};
        let mut rng = Rng::new(13);
        let (rows, dim) = (4, 40);
        let (x, w, dy) = (randn(&mut rng, rows * dim, 1.0), randn(&mut rng, dim, 1.0), randn(&mut rng, rows * dim, 1.0));
        let x16: Vec<u16> = x.iter().map(|&v| to_bf16(v)).collect();
        let xr: Vec<f32> = x16.iter().map(|&b| to_f32(b)).collect();
        let rstd: Vec<f32> = (0..rows).map(|i| 0.5 + i as f32).collect();
        let (mut y16, mut y32) = (vec![0.0; rows * dim], vec![0.0; rows * dim]);
        rmsnorm_apply(&x16, &w, &rstd, &mut y16);
        rmsnorm_apply(&xr, &w, &rstd, &mut y32);
        assert_eq!(y16, y32);
        let (mut d16, mut d32) = (vec![1.0; rows * dim], vec![1.0; rows * dim]);
        rmsnorm_backward(&dy, &x16, &w, &rstd, &mut d16);
        rmsnorm_backward(&dy, &xr, &w, &rstd, &mut d32);
        assert_eq!(d16, d32);
    }

    #[test]
    fn forward_matches_definition_and_gradient_checks() {
        let mut rng = Rng::new(11);
        let (rows, dim) = (5, 24);
        let x = randn(&mut rng, rows * dim, 1.0);
        let w = randn(&mut rng, dim, 1.0);
        let probe = randn(&mut rng, rows * dim, 1.0);
        let mut y = vec![0.0; rows * dim];
        let mut rstd = vec![0.0; rows];
        rmsnorm_forward(&x, &w, 1e-5, &mut y, &mut rstd);
        let mut again = vec![0.0; rows * dim];
        rmsnorm_apply(&x, &w, &rstd, &mut again);
        assert_eq!(again, y);
        let ms: f32 = x[..dim].iter().map(|v| v * v).sum::<f32>() / dim as f32;
        assert!((y[3] - w[3] * x[3] / (ms + 1e-5).sqrt()).abs() < 1e-5);

        let mut dx = vec![0.0; rows * dim];
        rmsnorm_backward(&probe, &x, &w, &rstd, &mut dx);
        let loss = |xp: &[f32]| {
            let mut y = vec![0.0; rows * dim];
            let mut r = vec![0.0; rows];
            rmsnorm_forward(xp, &w, 1e-5, &mut y, &mut r);
            dot(&y, &probe)
        };
        check_directional("rmsnorm dx", &x, &dx, loss, 1);
    }
}
