//! Helpers for the kernels' tests: deterministic random data and a central-difference
//! gradient check that is the independent reference for every backward pass.

use rand_distr::{Distribution, StandardNormal};
use rand_xoshiro::Xoshiro256PlusPlus;
use rand_xoshiro::rand_core::SeedableRng;

pub fn random_vec(len: usize, seed: u64) -> Vec<f32> {
    let mut rng = Xoshiro256PlusPlus::seed_from_u64(seed);
    (0..len).map(|_| StandardNormal.sample(&mut rng)).collect()
}

/// Compare `analytic` (d loss / d x) against central differences of `loss` at `x`, on up to
/// 150 evenly spaced coordinates. The loss is evaluated in f64 so the difference quotient is
/// limited by the f32 kernel's rounding, not by the summation.
pub fn check_grad(what: &str, x: &[f32], analytic: &[f32], loss: impl Fn(&[f32]) -> f64) {
    assert_eq!(x.len(), analytic.len(), "{what}: gradient length");
    let eps = 1e-3f32;
    let step = (x.len() / 150).max(1);
    let mut xp = x.to_vec();
    for i in (0..x.len()).step_by(step) {
        xp[i] = x[i] + eps;
        let up = loss(&xp);
        xp[i] = x[i] - eps;
        let down = loss(&xp);
        xp[i] = x[i];
        let numeric = (up - down) / (2.0 * eps as f64);
        let a = analytic[i] as f64;
        let tol = 2e-3 * (1.0 + numeric.abs().max(a.abs()));
        assert!((a - numeric).abs() <= tol, "{what}[{i}]: analytic {a} vs numeric {numeric}");
    }
}
