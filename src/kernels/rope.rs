//! Rotary position embeddings in transformers' "rotate_half" layout: the first and second halves of
//! each head vector form the (real, imaginary) pairs. RoPE is fused with the layout change between
//! token-major projections `[tokens, heads·head_dim]` and head-major attention `[batch, heads, seq, head_dim]`.

use rayon::prelude::*;

/// How rotation frequencies are derived (transformers' `rope_type`).
#[derive(Clone, Debug, PartialEq)]
pub enum RopeScaling {
    Default,
    /// Positions divided by `factor`.
    Linear {
        factor: f32,
    },
    /// Llama 3.1's frequency-dependent scaling.
    Llama3 {
        factor: f32,
        low_freq_factor: f32,
        high_freq_factor: f32,
        original_max_position_embeddings: f32,
    },
}

/// Inverse frequencies for a head of `head_dim`, computed in f32 exactly as transformers does.
pub fn inverse_frequencies(head_dim: usize, theta: f32, scaling: &RopeScaling) -> Vec<f32> {
    let base: Vec<f32> = (0..head_dim / 2)
        .map(|i| {
            let e = (2 * i) as f32 / head_dim as f32;
            1.0f32 / ((theta as f64).powf(e as f64) as f32)
        })
        .collect();
    match *scaling {
        RopeScaling::Default => base,
        RopeScaling::Linear { factor } => base.iter().map(|f| f / factor).collect(),
        RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, original_max_position_embeddings: old } => {
            let low_freq_wavelen = old / low_freq_factor;
            let high_freq_wavelen = old / high_freq_factor;
            base.iter()
                .map(|&f| {
                    let wavelen = 2.0 * std::f32::consts::PI / f;
                    if wavelen < high_freq_wavelen {
                        f
                    } else if wavelen > low_freq_wavelen {
                        f / factor
                    } else {
                        let smooth = (old / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor);
                        (1.0 - smooth) * f / factor + smooth * f
                    }
                })
                .collect()
        }
    }
}

/// cos/sin of every (position, frequency) pair used by one batch: `[tokens, head_dim/2]` each.
pub struct RopeAngles {
    pub cos: Vec<f32>,
    pub sin: Vec<f32>,
    pub half: usize,
}

impl RopeAngles {
    pub fn new(inv_freq: &[f32], positions: &[u32]) -> Self {
        let half = inv_freq.len();
        let mut cos = Vec::with_capacity(positions.len() * half);
        let mut sin = Vec::with_capacity(positions.len() * half);
        for &p in positions {
            for &f in inv_freq {
                // The angle is rounded to f32 first, as in transformers, then its cosine is taken.
                let a = (f * p as f32) as f64;
                cos.push(a.cos() as f32);
                sin.push(a.sin() as f32);
            }
        }
        RopeAngles { cos, sin, half }
    }
}

/// Shape of one attention operand in both layouts.
#[derive(Clone, Copy, Debug)]
pub struct HeadLayout {
    pub batch: usize,
    pub seq: usize,
    pub heads: usize,
    pub head_dim: usize,
}

/// Token-major `x` → head-major `out`, rotating each head vector when `angles` is given.
pub fn to_heads(x: &[f32], out: &mut [f32], l: HeadLayout, angles: Option<&RopeAngles>) {
    let _timer = crate::profile::time(crate::profile::Phase::Elementwise);
    let HeadLayout { seq, heads, head_dim: hd, .. } = l;
    assert_eq!(x.len(), l.batch * seq * heads * hd);
    assert_eq!(out.len(), x.len());
    out.par_chunks_mut(seq * hd).enumerate().for_each(|(bh, dst)| {
        let (b, h) = (bh / heads, bh % heads);
        for t in 0..seq {
            let tok = b * seq + t;
            let src = &x[(tok * heads + h) * hd..][..hd];
            let d = &mut dst[t * hd..][..hd];
            match angles {
                None => d.copy_from_slice(src),
                Some(a) => {
                    let half = a.half;
                    let (c, s) = (&a.cos[tok * half..][..half], &a.sin[tok * half..][..half]);
                    for i in 0..half {
                        let (x1, x2) = (src[i], src[i + half]);
                        d[i] = x1 * c[i] - x2 * s[i];
                        d[i + half] = x2 * c[i] + x1 * s[i];
                    }
                }
            }
        }
    });
}

/// Head-major `x` → token-major `out`; with `angles`, applies the transpose of the rotation, which
/// is the backward of `to_heads` (and also its exact inverse).
pub fn from_heads(x: &[f32], out: &mut [f32], l: HeadLayout, angles: Option<&RopeAngles>) {
    let _timer = crate::profile::time(crate::profile::Phase::Elementwise);
    let HeadLayout { seq, heads, head_dim: hd, .. } = l;
    assert_eq!(x.len(), l.batch * seq * heads * hd);
    assert_eq!(out.len(), x.len());
    out.par_chunks_mut(heads * hd).enumerate().for_each(|(tok, dst)| {
        let (b, t) = (tok / seq, tok % seq);
        for h in 0..heads {
            let src = &x[((b * heads + h) * seq + t) * hd..][..hd];
            let d = &mut dst[h * hd..][..hd];
            match angles {
                None => d.copy_from_slice(src),
                Some(a) => {
                    let half = a.half;
                    let (c, s) = (&a.cos[tok * half..][..half], &a.sin[tok * half..][..half]);
                    for i in 0..half {
                        let (g1, g2) = (src[i], src[i + half]);
                        d[i] = g1 * c[i] + g2 * s[i];
                        d[i + half] = g2 * c[i] - g1 * s[i];
                    }
                }
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::testutil::{check_directional, dot, randn};
    use crate::rng::Rng;

    #[test]
    fn rotation_gradient_and_inverse() {
        let mut rng = Rng::new(5);
        let l = HeadLayout { batch: 2, seq: 3, heads: 2, head_dim: 8 };
        let n = 2 * 3 * 2 * 8;
        let positions: Vec<u32> = (0..6).map(|i| (i % 3) as u32 + 4).collect();
        let inv = inverse_frequencies(8, 10000.0, &RopeScaling::Default);
        let angles = RopeAngles::new(&inv, &positions);
        let x = randn(&mut rng, n, 1.0);
        let probe = randn(&mut rng, n, 1.0);
        let mut dx = vec![0.0; n];
        from_heads(&probe, &mut dx, l, Some(&angles));
        let loss = |xp: &[f32]| {
            let mut y = vec![0.0; n];
            to_heads(xp, &mut y, l, Some(&angles));
            dot(&y, &probe)
        };
        check_directional("rope", &x, &dx, loss, 2);
        // A rotation's transpose is its inverse.
        let mut y = vec![0.0; n];
        let mut back = vec![0.0; n];
        to_heads(&x, &mut y, l, Some(&angles));
        from_heads(&y, &mut back, l, Some(&angles));
        assert!(x.iter().zip(&back).all(|(a, b)| (a - b).abs() < 1e-5));
    }

    #[test]
    fn llama3_scaling_keeps_high_and_divides_low_frequencies() {
        let s = RopeScaling::Llama3 { factor: 8.0, low_freq_factor: 1.0, high_freq_factor: 4.0, original_max_position_embeddings: 32.0 };
        let base = inverse_frequencies(16, 10000.0, &RopeScaling::Default);
        let scaled = inverse_frequencies(16, 10000.0, &s);
        assert_eq!(scaled[0], base[0]); // wavelength 2π < 8: unchanged
        assert_eq!(scaled[7], base[7] / 8.0); // wavelength ≫ 32: divided by factor
        assert!(scaled[1] < base[1] && scaled[1] > base[1] / 8.0); // wavelength ≈ 20: smoothed
    }
}
