//! Test-set evaluation.

use crate::data::mnist::Dataset;
use crate::layers::softmax::{argmax, softmax_cross_entropy};
use crate::model::{Mode, Model, Workspace, forward};

#[derive(Clone, Debug, serde::Serialize)]
pub struct EvalResult {
    pub loss: f32,
    pub accuracy: f32,
    pub samples: usize,
    /// `confusion[true][predicted]` counts.
    pub confusion: Vec<Vec<usize>>,
}

/// Loss and accuracy over the whole dataset, in batches of the workspace's size.
pub fn evaluate(model: &Model, ws: &mut Workspace, ds: &Dataset) -> EvalResult {
    let classes = model.classes();
    let mut confusion = vec![vec![0; classes]; classes];
    let (mut loss_sum, mut correct) = (0.0f64, 0);
    let il = ds.image_len();
    for start in (0..ds.len()).step_by(ws.batch) {
        let n = ws.batch.min(ds.len() - start);
        ws.input_mut()[..n * il].copy_from_slice(&ds.images[start * il..(start + n) * il]);
        forward(model, ws, n, Mode::Eval);
        let labels = &ds.labels[start..start + n];
        let mut probs = vec![0.0; n * classes];
        let (loss, c) = softmax_cross_entropy(ws.logits(n, classes), labels, classes, &mut probs, None);
        loss_sum += loss as f64 * n as f64;
        correct += c;
        for (p, &y) in probs.chunks_exact(classes).zip(labels) {
            confusion[y as usize][argmax(p)] += 1;
        }
    }
    EvalResult { loss: (loss_sum / ds.len() as f64) as f32, accuracy: correct as f32 / ds.len() as f32, samples: ds.len(), confusion }
}
