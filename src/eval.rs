//! Evaluation: loss, top-1 and top-5 accuracy and the confusion matrix over a labelled set,
//! optionally averaging the softmax over several views of each image (the paper's ten crops).

use crate::data::mnist::Dataset;
use crate::data::source::Source;
use crate::layers::softmax::{argmax, softmax};
use crate::model::{Mode, Model, Workspace, forward};
use anyhow::Result;

#[derive(Clone, Debug, serde::Serialize)]
pub struct EvalResult {
    pub loss: f32,
    /// Top-1 accuracy.
    pub accuracy: f32,
    pub top5_accuracy: f32,
    pub samples: usize,
    /// `confusion[true][predicted]` counts.
    pub confusion: Vec<Vec<usize>>,
}

/// Evaluate `labels.len()` samples in batches of the workspace's size. `fill(range, view,
/// input)` writes view `view` of samples `range` into the input buffer; the softmax of the
/// `views` views is averaged before scoring.
pub fn evaluate_views(
    model: &Model,
    ws: &mut Workspace,
    labels: &[u32],
    views: usize,
    mut fill: impl FnMut(std::ops::Range<usize>, usize, &mut [f32]) -> Result<()>,
) -> Result<EvalResult> {
    let classes = model.classes();
    let mut confusion = vec![vec![0; classes]; classes];
    let (mut loss_sum, mut top1, mut top5) = (0.0f64, 0, 0);
    for start in (0..labels.len()).step_by(ws.batch) {
        let n = ws.batch.min(labels.len() - start);
        let mut mean = vec![0.0f32; n * classes];
        let mut probs = vec![0.0f32; n * classes];
        for view in 0..views {
            fill(start..start + n, view, ws.input_mut())?;
            forward(model, ws, n, Mode::Eval);
            softmax(ws.logits(n, classes), classes, &mut probs);
            mean.iter_mut().zip(&probs).for_each(|(m, p)| *m += p / views as f32);
        }
        for (p, &y) in mean.chunks_exact(classes).zip(&labels[start..start + n]) {
            let y = y as usize;
            loss_sum -= (p[y].max(f32::MIN_POSITIVE) as f64).ln();
            let predicted = argmax(p);
            top1 += usize::from(predicted == y);
            // In the top five: fewer than five classes score higher.
            top5 += usize::from(p.iter().filter(|&&q| q > p[y]).count() < 5);
            confusion[y][predicted] += 1;
        }
    }
    let total = labels.len().max(1) as f32;
    Ok(EvalResult {
        loss: (loss_sum / labels.len().max(1) as f64) as f32,
        accuracy: top1 as f32 / total,
        top5_accuracy: top5 as f32 / total,
        samples: labels.len(),
        confusion,
    })
}

/// An in-memory dataset (MNIST), one view per image.
pub fn evaluate(model: &Model, ws: &mut Workspace, ds: &Dataset) -> EvalResult {
    let il = ds.image_len();
    evaluate_views(model, ws, &ds.labels, 1, |range, _, input| {
        input[..range.len() * il].copy_from_slice(&ds.images[range.start * il..range.end * il]);
        Ok(())
    })
    .expect("copying from memory cannot fail")
}

/// Loss, top-1/top-5 accuracy and confusion on a source's test (MNIST) or validation set.
pub fn evaluate_source(model: &Model, ws: &mut Workspace, source: &Source) -> Result<EvalResult> {
    evaluate_views(model, ws, &source.eval_labels(), source.eval_views(), |range, view, input| source.fill_eval(range, view, input))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layers::linear::LinearSpec;
    use crate::model::{Architecture, LayerSpec};

    #[test]
    fn top1_top5_loss_and_averaged_views_by_hand() {
        // A linear model on 1x1x1 inputs: logits = w * x + b with w = 1 for class c's... kept
        // trivial: logits = x * [0, 1, 2, 3, 4, 5] (bias 0), so x > 0 ranks class 5 first.
        let arch = Architecture {
            name: "t".into(),
            input: [1, 1, 1],
            layers: vec![LayerSpec::Linear(LinearSpec { name: "fc".into(), out: 6, relu: false })],
            init: Default::default(),
            input_scale: 1.0,
        };
        let mut m = Model::new(&arch).unwrap();
        m.params[0].value = vec![0.0, 1.0, 2.0, 3.0, 4.0, 5.0];
        let mut ws = Workspace::new(&m, 2, false);
        // Sample 0 (label 5) sees x = 1 and x = 3 in two views; sample 1 (label 0) x = 2, 2.
        let views = [[1.0, 2.0], [3.0, 2.0]];
        let r = evaluate_views(&m, &mut ws, &[5, 0], 2, |range, view, input| {
            input[..range.len()].copy_from_slice(&views[view][range]);
            Ok(())
        })
        .unwrap();
        // Sample 0: top-1 right. Sample 1: class 0 ranks last of 6, so not in the top five.
        assert_eq!((r.accuracy, r.top5_accuracy), (0.5, 0.5));
        assert_eq!(r.confusion[0][5], 1);
        let softmax_at = |x: f32, c: usize| (c as f32 * x).exp() / (0..6).map(|k| (k as f32 * x).exp()).sum::<f32>();
        let p0 = (softmax_at(1.0, 5) + softmax_at(3.0, 5)) / 2.0;
        let p1 = softmax_at(2.0, 0);
        let want = -(p0.ln() + p1.ln()) / 2.0;
        assert!((r.loss - want).abs() < 1e-4, "{} vs {want}", r.loss);
    }
}
