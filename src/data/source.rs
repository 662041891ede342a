//! Where a training run's examples come from: MNIST held in memory, or an ImageFolder dataset
//! decoded batch by batch. Training batches are made on a background thread, up to
//! `PREFETCH` steps ahead, so a step never waits for image decoding that could have
//! overlapped the previous one.

use super::batch::{epoch_order, fill_batch};
use super::folder::is_image_folder;
use super::mnist::{self, Dataset, Split, dummy_sample};
use super::pipeline::FolderData;
use crate::rng::stream_id;
use anyhow::{Result, bail};
use std::ops::Range;
use std::path::Path;
use std::sync::Arc;
use std::sync::mpsc::{Receiver, sync_channel};

/// Batches prepared ahead of the training step.
pub const PREFETCH: usize = 2;

pub enum Source {
    /// MNIST; `shift` is the random translation augmentation (0 = off).
    Mnist {
        train: Dataset,
        test: Dataset,
        shift: usize,
    },
    Folder {
        data: FolderData,
        ten_crop: bool,
    },
    /// Random images, N(0, 1) per pixel (like mean-subtracted inputs), labels cycling through
    /// the classes, each generated from its index: throughput runs without data (`--dummy`).
    Dummy {
        shape: [usize; 3],
        classes: usize,
    },
}

/// How `Source::open` prepares the data.
#[derive(Clone, Copy, Debug, Default)]
pub struct OpenOptions<'a> {
    /// MNIST: random translation of up to this many pixels (0 = off).
    pub shift: usize,
    /// ImageFolder: evaluate on ten crops.
    pub ten_crop: bool,
    /// ImageFolder: fail on unreadable images instead of skipping them.
    pub strict_images: bool,
    /// Without it, MNIST's training files are neither needed nor read (`eval` on a directory
    /// of test files).
    pub for_training: bool,
    /// Where an ImageFolder's statistics are cached (none: computed every time).
    pub cache_dir: Option<&'a Path>,
}

/// A dummy epoch is ImageNet's training set size; its evaluation set is small.
const DUMMY_TRAIN: usize = 1_281_167;
const DUMMY_VAL: usize = 256;

/// One training batch: NHWC input and labels.
pub type Batch = (Vec<f32>, Vec<u32>);

impl Source {
    /// ImageFolder data if `dir` has `train/` and `val/`, else MNIST IDX files (the vendored
    /// copy by default), as inputs of shape `input` (HWC) scaled by `input_scale`.
    pub fn open(dir: Option<&Path>, input: [usize; 3], input_scale: f32, options: &OpenOptions) -> Result<Source> {
        let OpenOptions { shift, ten_crop, strict_images, for_training, cache_dir } = *options;
        if let Some(d) = dir.filter(|d| is_image_folder(d)) {
            let [h, w, c] = input;
            if h != w || c != 3 {
                bail!("{} holds RGB images; the model takes {h}x{w}x{c} inputs", d.display());
            }
            return Ok(Source::Folder { data: FolderData::open(d, h, input_scale, strict_images, cache_dir)?, ten_crop });
        }
        let (dir, strict) = mnist::resolve_dir(dir);
        let train = if for_training { Some(mnist::load(&dir, Split::Train, strict)?) } else { None };
        let test = mnist::load(&dir, Split::Test, strict)?;
        let train =
            train.unwrap_or(Dataset { images: Vec::new(), labels: Vec::new(), rows: test.rows, cols: test.cols, channels: test.channels });
        // Both splits, before any training: a test set of another size would otherwise only
        // fail at the first evaluation, after the run's work.
        for (split, d) in [("train", &train), ("t10k", &test)] {
            if [d.rows, d.cols, d.channels] != input {
                bail!(
                    "{}: {split}-images holds {}x{}x{} images, but the model takes {}x{}x{}",
                    dir.display(),
                    d.rows,
                    d.cols,
                    d.channels,
                    input[0],
                    input[1],
                    input[2]
                );
            }
        }
        Ok(Source::Mnist { train, test, shift })
    }

    /// Random images of `shape` (HWC) in `classes` classes.
    pub fn dummy(shape: [usize; 3], classes: usize) -> Source {
        Source::Dummy { shape, classes }
    }

    pub fn train_len(&self) -> usize {
        match self {
            Source::Mnist { train, .. } => train.len(),
            Source::Folder { data, .. } => data.train.len(),
            Source::Dummy { .. } => DUMMY_TRAIN,
        }
    }

    pub fn classes(&self) -> usize {
        match self {
            Source::Mnist { .. } => 10,
            Source::Folder { data, .. } => data.classes.len(),
            Source::Dummy { classes, .. } => *classes,
        }
    }

    /// What evaluation runs on, for messages.
    pub fn eval_split(&self) -> &'static str {
        match self {
            Source::Mnist { .. } => "test",
            Source::Folder { .. } => "validation",
            Source::Dummy { .. } => "random",
        }
    }

    /// The training batch of `indices` in `epoch`, augmented per the source's settings.
    pub fn fill_train(&self, indices: &[u32], seed: u64, epoch: u64, input: &mut [f32], labels: &mut Vec<u32>) -> Result<()> {
        match self {
            Source::Mnist { train, shift, .. } => {
                fill_batch(train, indices, *shift, stream_id(&[seed, epoch, 0x0041_5547]), input, labels);
                Ok(())
            }
            Source::Folder { data, .. } => data.fill_train(indices, FolderData::epoch_stream(seed, epoch), input, labels),
            Source::Dummy { shape, classes } => {
                let len = shape.iter().product();
                labels.clear();
                labels.extend(indices.iter().zip(input.chunks_exact_mut(len)).map(|(&i, dst)| dummy_sample(i as usize, *classes, dst)));
                Ok(())
            }
        }
    }

    /// The labels of the training set.
    pub fn train_labels(&self) -> Vec<u32> {
        match self {
            Source::Mnist { train, .. } => train.labels.clone(),
            Source::Folder { data, .. } => data.train.iter().map(|s| s.label).collect(),
            Source::Dummy { classes, .. } => (0..DUMMY_TRAIN).map(|i| (i % classes) as u32).collect(),
        }
    }

    /// Training samples `range` into `input` as evaluation sees images: no augmentation.
    pub fn fill_train_plain(&self, range: Range<usize>, input: &mut [f32]) -> Result<()> {
        match self {
            Source::Mnist { train, .. } => {
                let il = train.image_len();
                input[..range.len() * il].copy_from_slice(&train.images[range.start * il..range.end * il]);
                Ok(())
            }
            Source::Folder { data, .. } => data.fill_train_centre(range, input),
            Source::Dummy { shape, classes } => {
                let len: usize = shape.iter().product();
                for (i, dst) in range.zip(input.chunks_exact_mut(len)) {
                    dummy_sample(i, *classes, dst);
                }
                Ok(())
            }
        }
    }

    /// The labels of the evaluation set: the test (MNIST) or validation set.
    pub fn eval_labels(&self) -> Vec<u32> {
        match self {
            Source::Mnist { test, .. } => test.labels.clone(),
            Source::Folder { data, .. } => data.val.iter().map(|s| s.label).collect(),
            Source::Dummy { classes, .. } => (0..DUMMY_VAL).map(|i| ((DUMMY_TRAIN + i) % classes) as u32).collect(),
        }
    }

    /// A name for each evaluation sample: its file, or its index in the test set.
    pub fn eval_names(&self) -> Vec<String> {
        match self {
            Source::Mnist { test, .. } => (0..test.len()).map(|i| format!("t10k #{i}")).collect(),
            Source::Folder { data, .. } => data.val.iter().map(|s| s.path.display().to_string()).collect(),
            Source::Dummy { .. } => (0..DUMMY_VAL).map(|i| format!("random #{i}")).collect(),
        }
    }

    /// Views per evaluation image whose predictions are averaged: ten crops or one.
    pub fn eval_views(&self) -> usize {
        match self {
            Source::Folder { ten_crop: true, .. } => 10,
            _ => 1,
        }
    }

    /// View `view` of evaluation samples `range` into `input` (NHWC).
    pub fn fill_eval(&self, range: Range<usize>, view: usize, input: &mut [f32]) -> Result<()> {
        match self {
            Source::Mnist { test, .. } => {
                let il = test.image_len();
                input[..range.len() * il].copy_from_slice(&test.images[range.start * il..range.end * il]);
                Ok(())
            }
            Source::Folder { data, ten_crop } => data.fill_val(range, view, *ten_crop, input),
            Source::Dummy { shape, classes } => {
                let len: usize = shape.iter().product();
                for (i, dst) in range.zip(input.chunks_exact_mut(len)) {
                    dummy_sample(DUMMY_TRAIN + i, *classes, dst);
                }
                Ok(())
            }
        }
    }
}

/// The training batches of steps `first..=last` (1-based; `batch` samples each, each epoch's
/// last partial batch dropped), made on a background thread in step order. Of each batch only
/// the samples at positions `shard` are made: a data-parallel rank's share (all of it for
/// one process). The thread stops when the receiver is dropped.
pub fn prefetch(
    source: Arc<Source>,
    seed: u64,
    batch: usize,
    shard: Range<usize>,
    input_len: usize,
    first: usize,
    last: usize,
) -> Receiver<Result<Batch>> {
    assert!(shard.end <= batch && !shard.is_empty(), "shard {shard:?} of a batch of {batch}");
    let (tx, rx) = sync_channel(PREFETCH);
    let steps_per_epoch = source.train_len() / batch;
    crate::denormals::spawn("prefetch", move || {
        let mut order = Vec::new();
        for step in first..=last {
            let (epoch, pos) = ((step - 1) / steps_per_epoch, (step - 1) % steps_per_epoch);
            if pos == 0 || order.is_empty() {
                order = epoch_order(source.train_len(), seed, epoch as u64);
            }
            let (mut input, mut labels) = (vec![0.0; shard.len() * input_len], Vec::with_capacity(shard.len()));
            let indices = &order[pos * batch..(pos + 1) * batch][shard.clone()];
            let made = source.fill_train(indices, seed, epoch as u64, &mut input, &mut labels);
            if tx.send(made.map(|_| (input, labels))).is_err() {
                return;
            }
        }
    })
    .expect("spawn the prefetch thread");
    rx
}
