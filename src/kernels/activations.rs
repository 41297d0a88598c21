//! SwiGLU: a = silu(g) ⊙ u, the gated MLP activation of the Llama family.

use rayon::prelude::*;

const CHUNK: usize = 4096;

#[inline]
fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + super::fastexp::exp(-x))
}

pub fn swiglu_forward(gate: &[f32], up: &[f32], out: &mut [f32]) {
    let _timer = crate::profile::time(crate::profile::Phase::Elementwise);
    assert_eq!(gate.len(), up.len());
    assert_eq!(gate.len(), out.len());
    out.par_chunks_mut(CHUNK).zip(gate.par_chunks(CHUNK)).zip(up.par_chunks(CHUNK)).for_each(|((o, g), u)| {
        for ((o, &g), &u) in o.iter_mut().zip(g).zip(u) {
            *o = g * sigmoid(g) * u;
        }
    });
}

/// The gradients of `swiglu_forward`: `d` holds dL/dout on entry and dL/dgate on return (in place:
/// these are the largest buffers of a training step); `dup` is overwritten with dL/dup.
/// silu'(g) = σ(g)·(1 + g·(1 − σ(g))).
pub fn swiglu_backward(gate: &[f32], up: &[f32], d: &mut [f32], dup: &mut [f32]) {
    let _timer = crate::profile::time(crate::profile::Phase::Elementwise);
    assert_eq!(gate.len(), d.len());
    d.par_chunks_mut(CHUNK).zip(dup.par_chunks_mut(CHUNK)).zip(gate.par_chunks(CHUNK).zip(up.par_chunks(CHUNK))).for_each(
        |((d, du), (g, u))| {
            for i in 0..g.len() {
                let s = sigmoid(g[i]);
                du[i] = d[i] * g[i] * s;
                d[i] *= u[i] * s * (1.0 + g[i] * (1.0 - s));
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
}
