//! `alexnet neighbours`: the paper's figure 4. Each query image beside the training images
//! whose features (fc7's by default: the last hidden layer) are nearest in Euclidean distance,
//! with the query's predicted top-5 classes, as one PNG.

use crate::data::source::Source;
use crate::layers::linear::FullyConnected;
use crate::layers::softmax::softmax;
use crate::model::{Mode, Model, Workspace, forward};
use anyhow::{Context, Result, bail};
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use rayon::prelude::*;
use std::path::PathBuf;

/// A query's result: the top-5 classes with probabilities and the `k` nearest training
/// samples (index, squared distance).
pub struct Row {
    pub top5: Vec<(usize, f32)>,
    pub nearest: Vec<(usize, f32)>,
}

/// For each of `queries` (one feature row of `dim` each) the `k` rows of `train` nearest to it.
pub fn nearest(train: &[f32], queries: &[f32], dim: usize, k: usize) -> Vec<Vec<(usize, f32)>> {
    queries
        .par_chunks(dim)
        .map(|q| {
            let mut d: Vec<(usize, f32)> =
                train.chunks_exact(dim).enumerate().map(|(i, t)| (i, t.iter().zip(q).map(|(a, b)| (a - b) * (a - b)).sum())).collect();
            // Ties by index, so the result does not depend on the sort.
            d.sort_by(|a, b| a.1.total_cmp(&b.1).then(a.0.cmp(&b.0)));
            d.truncate(k);
            d
        })
        .collect()
}

/// The top-5 classes of each of the `n` inputs in `ws` after a forward pass.
pub fn top5(model: &Model, ws: &mut Workspace, n: usize) -> Vec<Vec<(usize, f32)>> {
    forward(model, ws, n, Mode::Eval);
    let classes = model.classes();
    let mut probs = vec![0.0; n * classes];
    softmax(ws.logits(n, classes), classes, &mut probs);
    probs
        .chunks_exact(classes)
        .map(|p| {
            let mut ranked: Vec<usize> = (0..classes).collect();
            ranked.sort_by(|&a, &b| p[b].total_cmp(&p[a]).then(a.cmp(&b)));
            ranked.into_iter().take(5).map(|c| (c, p[c])).collect()
        })
        .collect()
}

const TILE: u32 = 96;
const GAP: u32 = 8;
const TEXT: u32 = 22;

/// The grid: a row per query, the query first (under it its top-5 classes), then its
/// neighbours (under each its label). `image(i)` is the query's (HWC floats) for `i` in
/// 0..rows, else training sample `i - rows`; each is shown scaled to its own range.
pub fn grid_png(rows: &[Row], labels: &[u32], shape: [usize; 3], image: impl Fn(usize) -> Vec<f32>) -> Result<(Vec<u8>, (u32, u32))> {
    let k = rows.iter().map(|r| r.nearest.len()).max().unwrap_or(0) as u32;
    let (width, height) = ((k + 1) * (TILE + GAP) + 3 * GAP, rows.len() as u32 * (TILE + TEXT + GAP) + GAP);
    let mut rgb = vec![255u8; (width * height * 3) as usize];
    let [h, w, c] = shape;
    let mut paint = |pixels: &[f32], x0: u32, y0: u32| {
        let (lo, hi) = pixels.iter().fold((f32::MAX, f32::MIN), |(lo, hi), &v| (lo.min(v), hi.max(v)));
        let span = (hi - lo).max(f32::MIN_POSITIVE);
        for (ty, tx) in (0..TILE).flat_map(|y| (0..TILE).map(move |x| (y, x))) {
            let (y, x) = (ty as usize * h / TILE as usize, tx as usize * w / TILE as usize);
            for ch in 0..3 {
                let v = pixels[(y * w + x) * c + ch.min(c - 1)];
                rgb[(((y0 + ty) * width + x0 + tx) * 3) as usize + ch] = (255.0 * (v - lo) / span).round() as u8;
            }
        }
    };
    for (r, row) in rows.iter().enumerate() {
        let y0 = GAP + r as u32 * (TILE + TEXT + GAP);
        paint(&image(r), GAP, y0);
        for (j, &(i, _)) in row.nearest.iter().enumerate() {
            paint(&image(rows.len() + i), 3 * GAP + (j as u32 + 1) * (TILE + GAP), y0);
        }
    }
    {
        crate::plot::register_font();
        let root = BitMapBackend::with_buffer(&mut rgb, (width, height)).into_drawing_area();
        let style = |size: i32| TextStyle::from(("sans-serif", size).into_font()).color(&BLACK).pos(Pos::new(HPos::Center, VPos::Top));
        for (r, row) in rows.iter().enumerate() {
            let y = (GAP + r as u32 * (TILE + TEXT + GAP) + TILE + 3) as i32;
            let top: Vec<String> = row.top5.iter().map(|(c, _)| c.to_string()).collect();
            let text = Text::new(top.join(" "), ((GAP + TILE / 2) as i32, y), style(14));
            root.draw(&text).map_err(|e| anyhow::anyhow!("drawing: {e}"))?;
            for (j, &(i, _)) in row.nearest.iter().enumerate() {
                let x = (3 * GAP + (j as u32 + 1) * (TILE + GAP) + TILE / 2) as i32;
                root.draw(&Text::new(labels[i].to_string(), (x, y), style(14))).map_err(|e| anyhow::anyhow!("drawing: {e}"))?;
            }
        }
        root.present().map_err(|e| anyhow::anyhow!("drawing: {e}"))?;
    }
    let mut png = Vec::new();
    image::ImageEncoder::write_image(image::codecs::png::PngEncoder::new(&mut png), &rgb, width, height, image::ExtendedColorType::Rgb8)
        .context("encoding a PNG")?;
    Ok((png, (width, height)))
}

/// What `alexnet neighbours` is asked.
pub struct Request<'a> {
    pub source: &'a Source,
    /// Default: the last hidden layer (the one before the classifier).
    pub layer: Option<&'a str>,
    pub k: usize,
    /// Image files, prepared as evaluation prepares images.
    pub files: &'a [PathBuf],
    /// Also the first this many evaluation (test or validation) images.
    pub test_queries: usize,
    pub batch: usize,
}

/// The figure for `req`: PNG bytes and size.
pub fn figure(model: &Model, req: &Request) -> Result<(Vec<u8>, (u32, u32))> {
    let names = model.layer_names();
    let layer = match req.layer {
        Some(name) => model.layer_index(name)?,
        None => {
            let linear: Vec<usize> =
                model.layers.iter().enumerate().filter(|(_, l)| l.op.downcast::<FullyConnected>().is_some()).map(|(i, _)| i).collect();
            *linear
                .iter()
                .rev()
                .nth(1)
                .with_context(|| format!("model {} has no hidden fully connected layer: say --layer", model.arch.name))?
        }
    };
    let il = model.input_len();
    // The queries' inputs: the files, then the first evaluation images.
    let mut queries = Vec::new();
    if !req.files.is_empty() {
        let folder = match req.source {
            Source::Folder { data, .. } => Some(data),
            _ => None,
        };
        queries.extend(crate::predict::prepare_images(model, req.files, folder)?);
    }
    let from_test = req.test_queries.min(req.source.eval_labels().len());
    let mut buf = vec![0.0; from_test * il];
    req.source.fill_eval(0..from_test, 0, &mut buf)?;
    queries.extend(buf);
    let q = queries.len() / il;
    if q == 0 {
        bail!("no queries: give image files or --test-queries N");
    }
    let mut ws = Workspace::keeping_outputs(model, q);
    ws.input_mut()[..q * il].copy_from_slice(&queries);
    let top = top5(model, &mut ws, q);
    let query_features = ws.layer_output(model, layer, q).to_vec();
    let labels = req.source.train_labels();
    eprintln!("{}: features of {} training images ...", names[layer], labels.len());
    let (dim, train) = crate::features::extract(model, layer, labels.len(), req.batch, |r, input| req.source.fill_train_plain(r, input))?;
    let rows: Vec<Row> =
        nearest(&train, &query_features, dim, req.k).into_iter().zip(top).map(|(nearest, top5)| Row { top5, nearest }).collect();
    grid_png(&rows, &labels, model.arch.input, |i| {
        if i < q {
            queries[i * il..(i + 1) * il].to_vec()
        } else {
            let mut one = vec![0.0; il];
            req.source.fill_train_plain(i - q..i - q + 1, &mut one).map(|_| one).unwrap_or_else(|_| vec![0.0; il])
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rows_by_euclidean_distance_ties_by_index() {
        let train = [0.0, 0.0, 3.0, 4.0, 1.0, 0.0, 0.0, 1.0];
        let got = nearest(&train, &[0.9, 0.1], 2, 3);
        assert_eq!(got[0].iter().map(|p| p.0).collect::<Vec<_>>(), [2, 0, 3]);
        assert!((got[0][0].1 - 0.02).abs() < 1e-6);
        // Rows 2 and 3 are equally far from (0.6, 0.6): the lower index first.
        assert_eq!(nearest(&train, &[0.6, 0.6], 2, 2)[0].iter().map(|p| p.0).collect::<Vec<_>>(), [2, 3]);
    }
}
