//! Softmax cross-entropy over logits, computed stably (max subtracted before `exp`).

/// Mean loss and number of correct argmax predictions over the batch. `probs` receives the
/// softmax; `d_logits`, if given, receives d(mean loss)/d logits = (p - onehot) / batch.
pub fn softmax_cross_entropy(
    logits: &[f32],
    labels: &[u32],
    classes: usize,
    probs: &mut [f32],
    d_logits: Option<&mut [f32]>,
) -> (f32, usize) {
    let batch = labels.len();
    softmax(&logits[..batch * classes], classes, &mut probs[..batch * classes]);
    let mut loss = 0.0f64;
    let mut correct = 0;
    for (p, &y) in probs.chunks_exact(classes).zip(labels) {
        loss -= (p[y as usize].max(f32::MIN_POSITIVE) as f64).ln();
        if argmax(p) == y as usize {
            correct += 1;
        }
    }
    if let Some(d) = d_logits {
        for ((d, p), &y) in d.chunks_exact_mut(classes).zip(probs.chunks_exact(classes)).zip(labels) {
            for (j, (d, p)) in d.iter_mut().zip(p).enumerate() {
                *d = (p - if j == y as usize { 1.0 } else { 0.0 }) / batch as f32;
            }
        }
    }
    ((loss / batch as f64) as f32, correct)
}

pub fn softmax(logits: &[f32], classes: usize, probs: &mut [f32]) {
    for (z, p) in logits.chunks_exact(classes).zip(probs.chunks_exact_mut(classes)) {
        let m = z.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
        let mut sum = 0.0;
        for (p, z) in p.iter_mut().zip(z) {
            *p = (z - m).exp();
            sum += *p;
        }
        p.iter_mut().for_each(|p| *p /= sum);
    }
}

/// Index of the largest value (the first on ties).
pub fn argmax(v: &[f32]) -> usize {
    v.iter().enumerate().fold(0, |best, (i, &x)| if x > v[best] { i } else { best })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layers::testing::{check_grad, random_vec};

    #[test]
    fn stable_for_huge_logits_and_matches_hand_values() {
        // logits [0, ln 3] -> p = [1/4, 3/4]; loss for label 1 = -ln(3/4).
        let mut p = [0.0; 2];
        let (loss, correct) = softmax_cross_entropy(&[0.0, 3f32.ln()], &[1], 2, &mut p, None);
        assert!((p[0] - 0.25).abs() < 1e-6 && (loss - (4.0f32 / 3.0).ln()).abs() < 1e-6 && correct == 1);
        let (loss, _) = softmax_cross_entropy(&[1e4, 0.0, -1e4], &[0], 3, &mut [0.0; 3], None);
        assert!(loss.is_finite() && loss.abs() < 1e-6);
    }

    #[test]
    fn gradient_matches_finite_differences() {
        let (batch, classes) = (4, 10);
        let z = random_vec(batch * classes, 41);
        let labels = [3u32, 0, 9, 3];
        let mut d = vec![0.0; z.len()];
        softmax_cross_entropy(&z, &labels, classes, &mut vec![0.0; z.len()], Some(&mut d));
        check_grad("softmax", &z, &d, |z| softmax_cross_entropy(z, &labels, classes, &mut vec![0.0; z.len()], None).0 as f64);
    }
}
