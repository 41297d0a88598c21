//! `torch.optim.AdamW` and `torch.nn.utils.clip_grad_norm_` over a flat parameter vector.

/// AdamW with decoupled weight decay and bias correction, step for step as PyTorch computes it.
#[derive(Clone, Debug, PartialEq)]
pub struct AdamW {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    pub m: Vec<f32>,
    pub v: Vec<f32>,
    /// Steps taken so far.
    pub step: u64,
}

impl AdamW {
    pub fn new(n: usize, beta1: f64, beta2: f64, eps: f64, weight_decay: f64) -> Self {
        AdamW { beta1, beta2, eps, weight_decay, m: vec![0.0; n], v: vec![0.0; n], step: 0 }
    }

    /// One update of `params` with gradient `grads` at learning rate `lr`.
    pub fn update(&mut self, params: &mut [f32], grads: &[f32], lr: f64) {
        let _timer = crate::profile::time(crate::profile::Phase::Optimizer);
        assert_eq!(params.len(), grads.len());
        assert_eq!(params.len(), self.m.len());
        self.step += 1;
        let t = self.step as i32;
        let decay = (1.0 - lr * self.weight_decay) as f32;
        let (b1, b2) = (self.beta1 as f32, self.beta2 as f32);
        let step_size = (lr / (1.0 - self.beta1.powi(t))) as f32;
        let bc2_sqrt = (1.0 - self.beta2.powi(t)).sqrt() as f32;
        let eps = self.eps as f32;
        for i in 0..params.len() {
            let g = grads[i];
            params[i] *= decay;
            // exp_avg.lerp_(grad, 1 - beta1); exp_avg_sq.mul_(beta2).addcmul_(grad, grad, 1 - beta2)
            self.m[i] += (1.0 - b1) * (g - self.m[i]);
            self.v[i] = self.v[i] * b2 + (1.0 - b2) * g * g;
            let denom = self.v[i].sqrt() / bc2_sqrt + eps;
            params[i] -= step_size * (self.m[i] / denom);
        }
    }
}

/// Scales `grads` so their global L2 norm is at most `max_norm`; returns the norm before
/// clipping. Like PyTorch, the factor is max_norm / (norm + 1e-6), capped at 1.
pub fn clip_grad_norm(grads: &mut [f32], max_norm: f64) -> f64 {
    let _timer = crate::profile::time(crate::profile::Phase::Optimizer);
    let norm = grads.iter().map(|&g| g as f64 * g as f64).sum::<f64>().sqrt();
    let coef = (max_norm / (norm + 1e-6)).min(1.0) as f32;
    if coef < 1.0 {
        for g in grads.iter_mut() {
            *g *= coef;
        }
    }
    norm
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_step_moves_each_weight_by_lr_against_the_gradient_sign() {
        // With bias correction, step 1 is lr·g/(|g| + eps) (plus weight decay).
        let mut p = vec![1.0f32, -2.0, 0.5];
        let g = vec![0.3f32, -4.0, 0.0];
        let mut opt = AdamW::new(3, 0.9, 0.999, 1e-8, 0.0);
        opt.update(&mut p, &g, 0.1);
        assert!((p[0] - 0.9).abs() < 1e-6 && (p[1] + 1.9).abs() < 1e-6 && p[2] == 0.5, "{p:?}");
        let mut q = vec![1.0f32];
        let mut opt = AdamW::new(1, 0.9, 0.999, 1e-8, 0.5);
        opt.update(&mut q, &[0.0], 0.1);
        assert!((q[0] - 0.95).abs() < 1e-7, "decoupled decay: {q:?}");
    }

    #[test]
    fn clipping_scales_to_max_norm() {
        let mut g = vec![3.0f32, 4.0];
        assert_eq!(clip_grad_norm(&mut g, 1.0), 5.0);
        assert!((g[0] - 0.6).abs() < 1e-6 && (g[1] - 0.8).abs() < 1e-6);
        let mut small = vec![0.1f32];
        clip_grad_norm(&mut small, 1.0);
        assert_eq!(small, vec![0.1]);
    }
}
