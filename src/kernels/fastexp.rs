//! A vectorizable f32 exp: exp(x) = 2ⁿ·e^r with n = round(x·log₂e) and |r| ≤ ln2/2, e^r by a
//! degree-6 polynomial. Relative error below 2e-7 over the clamped range [−87, 88]; the math
//! library's scalar expf was the largest non-GEMM cost of training (softmax and cross-entropy).

#[inline(always)]
pub fn exp(x: f32) -> f32 {
    const ROUND: f32 = 12_582_912.0; // 1.5·2²³: adding it rounds to an integer without a libm call
    let x = x.clamp(-87.0, 88.0);
    let t = mul_add(x, std::f32::consts::LOG2_E, ROUND);
    let n = t - ROUND;
    let ni = t.to_bits() as i32 - ROUND.to_bits() as i32;
    // Cody-Waite: ln2 split in a part exact in f32 and a remainder.
    let r = mul_add(-n, 1.428_606_8e-6, mul_add(-n, 0.693_145_75, x));
    let mut p = 1.0 / 720.0;
    for c in [1.0 / 120.0, 1.0 / 24.0, 1.0 / 6.0, 0.5, 1.0, 1.0] {
        p = mul_add(p, r, c);
    }
    f32::from_bits(((ni + 127) << 23) as u32) * p
}

/// `a·b + c`, fused into one instruction where the CPU has FMA (without it `f32::mul_add` would
/// be a slow library call).
#[inline(always)]
fn mul_add(a: f32, b: f32, c: f32) -> f32 {
    if cfg!(any(target_feature = "fma", target_arch = "aarch64")) {
        a.mul_add(b, c)
    } else {
        a * b + c
    }
}

/// `v[i] = exp(scale·v[i] − shift)` for every element; returns their sum.
pub fn exp_shifted_sum(v: &mut [f32], scale: f32, shift: f32) -> f64 {
    // 16 lanes: one AVX-512 register (two AVX2 ones) per step.
    let mut acc = [0.0f32; 16];
    let mut chunks = v.chunks_exact_mut(16);
    for c in &mut chunks {
        for k in 0..16 {
            c[k] = exp(mul_add(scale, c[k], -shift));
            acc[k] += c[k];
        }
    }
    let mut s: f64 = acc.iter().map(|&a| a as f64).sum();
    for x in chunks.into_remainder() {
        *x = exp(mul_add(scale, *x, -shift));
        s += *x as f64;
    }
    s
}

#[cfg(test)]
mod tests {
    #[test]
    fn matches_std_exp() {
        let mut worst = 0.0f64;
        let mut x = -87.0f32;
        while x < 88.0 {
            let (a, b) = (super::exp(x) as f64, (x as f64).exp());
            worst = worst.max((a - b).abs() / b);
            x += 0.0137;
        }
        assert!(worst < 3e-7, "max relative error {worst}");
        assert!(super::exp(f32::NEG_INFINITY) < 1e-37);
        let mut v = vec![0.0f32, 1.0, -1.0, 2.0, 0.5, -3.0, 4.0, 1.5, 0.25, -0.75];
        let want: f64 = v.iter().map(|&x| ((x - 1.0) as f64).exp()).sum();
        let got = super::exp_shifted_sum(&mut v, 1.0, 1.0);
        assert!((got - want).abs() < 1e-5 * want);
    }
}
