//! SwiGLU: a = silu(g) ⊙ u, the gated MLP activation of the Llama family.

use super::bf16::{to_bf16, AsF32};
use rayon::prelude::*;

const CHUNK: usize = 4096;

#[inline]
fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + super::fastexp::exp(-x))
}

/// `out = silu(gate) ⊙ up`; gate and up in f32 or bf16.
pub fn swiglu_forward<G: AsF32, U: AsF32>(gate: &[G], up: &[U], out: &mut [f32]) {
    let _timer = crate::profile::time(crate::profile::Phase::Elementwise);
    assert_eq!(gate.len(), up.len());
    assert_eq!(gate.len(), out.len());
    out.par_chunks_mut(CHUNK).zip(gate.par_chunks(CHUNK)).zip(up.par_chunks(CHUNK)).for_each(|((o, g), u)| {
        for ((o, &g), &u) in o.iter_mut().zip(g).zip(u) {
            let (g, u) = (g.as_f32(), u.as_f32());
            *o = g * sigmoid(g) * u;
        }
    });
}

/// `swiglu_forward` on f32 gate and up that also writes their bf16 roundings to `gate_bf16` and
/// `up_bf16` (kept for the backward pass): one pass over the two largest buffers of a layer
/// instead of two. `out` is computed from the f32 values, as `swiglu_forward` computes it.
pub fn swiglu_forward_keeping_bf16(gate: &[f32], up: &[f32], out: &mut [f32], gate_bf16: &mut [u16], up_bf16: &mut [u16]) {
    let _timer = crate::profile::time(crate::profile::Phase::Elementwise);
    assert!(gate.len() == up.len() && gate.len() == out.len() && gate_bf16.len() == gate.len() && up_bf16.len() == up.len());
    let kept = gate_bf16.par_chunks_mut(CHUNK).zip(up_bf16.par_chunks_mut(CHUNK));
    out.par_chunks_mut(CHUNK).zip(gate.par_chunks(CHUNK)).zip(up.par_chunks(CHUNK)).zip(kept).for_each(|(((o, g), u), (gk, uk))| {
        for i in 0..o.len() {
            let (g, u) = (g[i], u[i]);
            o[i] = g * sigmoid(g) * u;
            (gk[i], uk[i]) = (to_bf16(g), to_bf16(u));
        }
    });
}

/// The gradients of `swiglu_forward`: `d` holds dL/dout on entry and dL/dgate on return (in place:
/// these are the largest buffers of a training step); `dup` is overwritten with dL/dup.
/// silu'(g) = σ(g)·(1 + g·(1 − σ(g))).
pub fn swiglu_backward<G: AsF32, U: AsF32>(gate: &[G], up: &[U], d: &mut [f32], dup: &mut [f32]) {
    let _timer = crate::profile::time(crate::profile::Phase::Elementwise);
    assert_eq!(gate.len(), d.len());
    d.par_chunks_mut(CHUNK).zip(dup.par_chunks_mut(CHUNK)).zip(gate.par_chunks(CHUNK).zip(up.par_chunks(CHUNK))).for_each(
        |((d, du), (g, u))| {
            for i in 0..g.len() {
                let (g, u) = (g[i].as_f32(), u[i].as_f32());
                let s = sigmoid(g);
                du[i] = d[i] * g * s;
                d[i] *= u * s * (1.0 + g * (1.0 - s));
            }
        },
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::testutil::{check_directional, dot, randn};
    use crate::rng::Rng;

    #[test]
    fn swiglu_gradients() {
        let mut rng = Rng::new(4);
        let n = 50;
        let (g, u, probe) = (randn(&mut rng, n, 2.0), randn(&mut rng, n, 1.0), randn(&mut rng, n, 1.0));
        let (mut dg, mut du) = (probe.clone(), vec![0.0; n]);
        swiglu_backward(&g, &u, &mut dg, &mut du);
        let run = |g: &[f32], u: &[f32]| {
            let mut o = vec![0.0; n];
            swiglu_forward(g, u, &mut o);
            dot(&o, &probe)
        };
        check_directional("swiglu dgate", &g, &dg, |x| run(x, &u), 1);
        check_directional("swiglu dup", &u, &du, |x| run(&g, x), 2);
    }

    /// Kept in bf16, gate and up give what their f32 roundings give.
    #[test]
    fn bf16_inputs_read_as_their_values() {
        use crate::kernels::bf16::{to_bf16, to_f32};
        let mut rng = Rng::new(5);
        let n = 3 * CHUNK + 7;
        let (g, u, d) = (randn(&mut rng, n, 2.0), randn(&mut rng, n, 1.0), randn(&mut rng, n, 1.0));
        let (g16, u16): (Vec<u16>, Vec<u16>) = (g.iter().map(|&x| to_bf16(x)).collect(), u.iter().map(|&x| to_bf16(x)).collect());
        let (gr, ur): (Vec<f32>, Vec<f32>) = (g16.iter().map(|&b| to_f32(b)).collect(), u16.iter().map(|&b| to_f32(b)).collect());
        let (mut o16, mut o32) = (vec![0.0; n], vec![0.0; n]);
        swiglu_forward(&g16, &u16, &mut o16);
        swiglu_forward(&gr, &ur, &mut o32);
        assert_eq!(o16, o32);
        let (mut d16, mut du16, mut d32, mut du32) = (d.clone(), vec![0.0; n], d, vec![0.0; n]);
        swiglu_backward(&g16, &u16, &mut d16, &mut du16);
        swiglu_backward(&gr, &ur, &mut d32, &mut du32);
        assert_eq!((d16, du16), (d32, du32));
        // Keeping bf16 copies on the way: the output of the f32 values, and their roundings.
        let (mut o, mut gk, mut uk) = (vec![0.0; n], vec![0; n], vec![0; n]);
        swiglu_forward_keeping_bf16(&g, &u, &mut o, &mut gk, &mut uk);
        let mut plain = vec![0.0; n];
        swiglu_forward(&g, &u, &mut plain);
        assert_eq!((o, gk, uk), (plain, g16, u16));
    }
}
