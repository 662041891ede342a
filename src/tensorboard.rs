//! TensorBoard event files: what `tf.summary.FileWriter` (the notebook's TensorFlow 1) and
//! `torch.utils.tensorboard` write, so `tensorboard --logdir runs/` shows a run live.
//!
//! A file is a sequence of records: the data's length (u64, little-endian), the masked
//! CRC32C of those 8 bytes, the data (one serialized `Event`), the masked CRC32C of the data.
//! The messages below are the subset of TensorFlow's `event.proto`, `summary.proto`,
//! `tensor.proto` and `tensor_shape.proto` (proto3) that scalars, histograms, images and text
//! need, declared with their field numbers and encoded by `prost`: no protoc, no generated code.
//! (The `tensorboard-rs` crate pins protobuf 2 and image 0.23, a second copy of each beside
//! ours, for the same few messages.)

use crate::files::write_atomic;
use anyhow::{Context, Result, bail};
use prost::Message;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

#[derive(Clone, PartialEq, Message)]
pub struct Event {
    #[prost(double, tag = "1")]
    pub wall_time: f64,
    #[prost(int64, tag = "2")]
    pub step: i64,
    #[prost(string, optional, tag = "3")]
    pub file_version: Option<String>,
    #[prost(message, optional, tag = "5")]
    pub summary: Option<Summary>,
}

#[derive(Clone, PartialEq, Message)]
pub struct Summary {
    #[prost(message, repeated, tag = "1")]
    pub value: Vec<Value>,
}

#[derive(Clone, PartialEq, Message)]
pub struct Value {
    #[prost(string, tag = "1")]
    pub tag: String,
    #[prost(float, optional, tag = "2")]
    pub simple_value: Option<f32>,
    #[prost(message, optional, tag = "4")]
    pub image: Option<Image>,
    #[prost(message, optional, tag = "5")]
    pub histo: Option<Histogram>,
    #[prost(message, optional, tag = "8")]
    pub tensor: Option<Tensor>,
    #[prost(message, optional, tag = "9")]
    pub metadata: Option<SummaryMetadata>,
}

#[derive(Clone, PartialEq, Message)]
pub struct Image {
    #[prost(int32, tag = "1")]
    pub height: i32,
    #[prost(int32, tag = "2")]
    pub width: i32,
    /// 3: RGB.
    #[prost(int32, tag = "3")]
    pub colorspace: i32,
    #[prost(bytes = "vec", tag = "4")]
    pub encoded_image_string: Vec<u8>,
}

/// `bucket[i]` values fell in (`bucket_limit[i - 1]`, `bucket_limit[i]`].
#[derive(Clone, PartialEq, Message)]
pub struct Histogram {
    #[prost(double, tag = "1")]
    pub min: f64,
    #[prost(double, tag = "2")]
    pub max: f64,
    #[prost(double, tag = "3")]
    pub num: f64,
    #[prost(double, tag = "4")]
    pub sum: f64,
    #[prost(double, tag = "5")]
    pub sum_squares: f64,
    #[prost(double, repeated, tag = "6")]
    pub bucket_limit: Vec<f64>,
    #[prost(double, repeated, tag = "7")]
    pub bucket: Vec<f64>,
}

/// A string tensor: the text plugin's payload.
#[derive(Clone, PartialEq, Message)]
pub struct Tensor {
    /// 7: DT_STRING.
    #[prost(int32, tag = "1")]
    pub dtype: i32,
    #[prost(message, optional, tag = "2")]
    pub tensor_shape: Option<TensorShape>,
    #[prost(bytes = "vec", repeated, tag = "8")]
    pub string_val: Vec<Vec<u8>>,
}

/// A scalar shape: no dimensions.
#[derive(Clone, PartialEq, Message)]
pub struct TensorShape {}

#[derive(Clone, PartialEq, Message)]
pub struct SummaryMetadata {
    #[prost(message, optional, tag = "1")]
    pub plugin_data: Option<PluginData>,
}

#[derive(Clone, PartialEq, Message)]
pub struct PluginData {
    #[prost(string, tag = "1")]
    pub plugin_name: String,
}

/// TFRecord's CRC: CRC32C, rotated and offset so that a CRC of data holding CRCs is not
/// degenerate.
fn masked_crc(bytes: &[u8]) -> u32 {
    let crc = crc32c::crc32c(bytes);
    crc.rotate_right(15).wrapping_add(0xa282_ead8)
}

/// One record around `data`.
fn record(data: &[u8]) -> Vec<u8> {
    let len = (data.len() as u64).to_le_bytes();
    let mut out = Vec::with_capacity(data.len() + 16);
    out.extend(len);
    out.extend(masked_crc(&len).to_le_bytes());
    out.extend(data);
    out.extend(masked_crc(data).to_le_bytes());
    out
}

/// The events of an event file, checking every CRC. A record cut short at the end (a process
/// killed mid-write) ends the list.
pub fn read_events(path: &Path) -> Result<Vec<Event>> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    let mut events = Vec::new();
    let mut at = 0;
    while at + 12 <= bytes.len() {
        let len_bytes = &bytes[at..at + 8];
        let len = u64::from_le_bytes(len_bytes.try_into().expect("8 bytes")) as usize;
        let crc = u32::from_le_bytes(bytes[at + 8..at + 12].try_into().expect("4 bytes"));
        if crc != masked_crc(len_bytes) {
            bail!("{}: record at byte {at}: bad length checksum", path.display());
        }
        let Some(end) = (at + 12).checked_add(len).filter(|&e| e + 4 <= bytes.len()) else { break };
        let data = &bytes[at + 12..end];
        if u32::from_le_bytes(bytes[end..end + 4].try_into().expect("4 bytes")) != masked_crc(data) {
            bail!("{}: record at byte {at}: bad data checksum", path.display());
        }
        events.push(Event::decode(data).with_context(|| format!("{}: record at byte {at}: not an Event", path.display()))?);
        at = end + 4;
    }
    Ok(events)
}

/// The event files in `dir`, oldest first (their names start with a fixed-width timestamp).
pub fn event_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("cannot read {}", dir.display()))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with("events.out.tfevents.")))
        .collect();
    files.sort();
    Ok(files)
}

/// TensorFlow's default histogram buckets: +-1e-12 * 1.1^k up to 1e20, and 0 between, so
/// values from denormal-small to huge each land in a bucket of their magnitude.
fn bucket_limits() -> &'static [f64] {
    static LIMITS: std::sync::OnceLock<Vec<f64>> = std::sync::OnceLock::new();
    LIMITS.get_or_init(|| {
        let mut positive = Vec::new();
        let mut v = 1e-12;
        while v < 1e20 {
            positive.push(v);
            v *= 1.1;
        }
        let mut limits: Vec<f64> = positive.iter().rev().map(|v| -v).collect();
        limits.push(0.0);
        limits.extend(&positive);
        limits.push(f64::MAX);
        limits
    })
}

/// The histogram of `values` in TensorFlow's buckets, empty buckets left out (each run of
/// them but the one before a filled bucket, which gives that bucket its left edge).
pub fn histogram(values: &[f32]) -> Histogram {
    let limits = bucket_limits();
    let mut counts = vec![0u64; limits.len()];
    let (mut min, mut max, mut sum, mut sum_squares) = (f64::MAX, f64::MIN, 0.0, 0.0);
    for &v in values {
        let v = v as f64;
        if !v.is_finite() {
            continue;
        }
        (min, max, sum, sum_squares) = (min.min(v), max.max(v), sum + v, sum_squares + v * v);
        counts[limits.partition_point(|&l| l < v)] += 1;
    }
    let mut h = Histogram { min, max, num: counts.iter().sum::<u64>() as f64, sum, sum_squares, ..Default::default() };
    for (i, &c) in counts.iter().enumerate() {
        if c > 0 || counts.get(i + 1).is_some_and(|&next| next > 0) {
            h.bucket_limit.push(limits[i]);
            h.bucket.push(c as f64);
        }
    }
    h
}

/// Writes a run's events, flushed on request (every display step). Rank 0 only.
pub struct EventWriter {
    file: File,
    pub path: PathBuf,
    pending: Vec<u8>,
}

fn wall_time() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64())
}

impl EventWriter {
    /// A new event file in `run_dir`. A resumed run (`resumed_at`: its checkpoint's step) first
    /// drops from the existing files every event after that step, which the run will write
    /// again, so TensorBoard shows one line with no step twice.
    pub fn create(run_dir: &Path, resumed_at: Option<usize>) -> Result<EventWriter> {
        if let Some(step) = resumed_at {
            for old in event_files(run_dir)? {
                let events = read_events(&old)?;
                let kept: Vec<&Event> = events.iter().filter(|e| e.file_version.is_some() || e.step as usize <= step).collect();
                if kept.len() < events.len() {
                    let bytes: Vec<u8> = kept.iter().flat_map(|e| record(&e.encode_to_vec())).collect();
                    write_atomic(&old, &bytes)?;
                }
            }
        }
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname").map_or_else(|_| "localhost".into(), |h| h.trim().to_string());
        let secs = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
        // After every existing file in name order, even within the same second.
        let n = event_files(run_dir)?.len();
        let path = run_dir.join(format!("events.out.tfevents.{secs:010}.{host}.{}.{n}", std::process::id()));
        let file = File::create(&path).with_context(|| format!("cannot create {}", path.display()))?;
        let mut w = EventWriter { file, path, pending: Vec::new() };
        w.push(Event { wall_time: wall_time(), file_version: Some("brain.Event:2".into()), ..Default::default() });
        w.flush()?;
        Ok(w)
    }

    fn push(&mut self, event: Event) {
        self.pending.extend(record(&event.encode_to_vec()));
    }

    fn summary(&mut self, step: usize, value: Vec<Value>) {
        self.push(Event { wall_time: wall_time(), step: step as i64, summary: Some(Summary { value }), ..Default::default() });
    }

    /// Scalars (the loss, accuracy, ... charts), by tag.
    pub fn scalars(&mut self, step: usize, values: &[(&str, f64)]) {
        let value = values.iter().map(|&(tag, v)| Value { tag: tag.into(), simple_value: Some(v as f32), ..Default::default() }).collect();
        self.summary(step, value);
    }

    /// Histograms of named tensors (weights, gradients).
    pub fn histograms<'a>(&mut self, step: usize, tensors: impl Iterator<Item = (String, &'a [f32])>) {
        let value = tensors.map(|(tag, v)| Value { tag, histo: Some(histogram(v)), ..Default::default() }).collect();
        self.summary(step, value);
    }

    /// A PNG image of `width` x `height` pixels.
    pub fn image(&mut self, step: usize, tag: &str, png: Vec<u8>, (width, height): (u32, u32)) {
        let image = Image { height: height as i32, width: width as i32, colorspace: 3, encoded_image_string: png };
        self.summary(step, vec![Value { tag: tag.into(), image: Some(image), ..Default::default() }]);
    }

    /// Markdown text (the text plugin's dashboard).
    pub fn text(&mut self, step: usize, tag: &str, markdown: &str) {
        let tensor = Tensor { dtype: 7, tensor_shape: Some(TensorShape {}), string_val: vec![markdown.as_bytes().to_vec()] };
        let metadata = SummaryMetadata { plugin_data: Some(PluginData { plugin_name: "text".into() }) };
        self.summary(step, vec![Value { tag: tag.into(), tensor: Some(tensor), metadata: Some(metadata), ..Default::default() }]);
    }

    /// Write what is pending: TensorBoard, reading the file as it grows, shows it now.
    pub fn flush(&mut self) -> Result<()> {
        self.file
            .write_all(&self.pending)
            .and_then(|_| self.file.flush())
            .with_context(|| format!("cannot write {}", self.path.display()))?;
        self.pending.clear();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The masked CRC32C of TFRecord files, against values from TensorFlow's own
    /// `tensorflow.python.lib.io.tf_record` (`masked_crc32c`): the CRC32C check value of
    /// "123456789" is 0xe3069283 (RFC 3720), and masking is rotate-right-15 plus 0xa282ead8.
    #[test]
    fn record_checksums_are_tfrecords() {
        assert_eq!(crc32c::crc32c(b"123456789"), 0xe306_9283);
        assert_eq!(masked_crc(b"123456789"), 0xe306_9283u32.rotate_right(15).wrapping_add(0xa282_ead8));
        let r = record(b"abc");
        assert_eq!(r.len(), 8 + 4 + 3 + 4);
        assert_eq!(&r[..8], &3u64.to_le_bytes());
        assert_eq!(&r[12..15], b"abc");
    }

    #[test]
    fn events_round_trip_and_a_resume_drops_the_events_after_its_checkpoint() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = EventWriter::create(dir.path(), None).unwrap();
        for step in 1..=6 {
            w.scalars(step, &[("train/loss", 1.0 / step as f64)]);
        }
        w.histograms(6, [("weights/w".to_string(), &[0.5f32, -2.0, 1e-39, 0.0][..])].into_iter());
        w.text(0, "config", "`x`");
        w.flush().unwrap();
        let events = read_events(&w.path).unwrap();
        assert_eq!(events.len(), 1 + 6 + 2);
        assert_eq!(events[0].file_version.as_deref(), Some("brain.Event:2"));
        let h = events[7].summary.as_ref().unwrap().value[0].histo.clone().unwrap();
        assert_eq!((h.num, h.min, h.max), (4.0, -2.0, 0.5));
        assert_eq!(h.bucket.iter().sum::<f64>(), 4.0);
        // Resumed from a checkpoint at step 4: steps 5 and 6 (and the histogram) go.
        let w2 = EventWriter::create(dir.path(), Some(4)).unwrap();
        let kept = read_events(&w.path).unwrap();
        assert_eq!(kept.iter().filter(|e| e.summary.is_some()).map(|e| e.step).collect::<Vec<_>>(), [1, 2, 3, 4, 0]);
        assert_eq!(event_files(dir.path()).unwrap(), [w.path.clone(), w2.path.clone()]);
    }

    /// Every value in the bucket of its magnitude: the denormal 1e-39 above 0, below 1e-12.
    #[test]
    fn histogram_buckets_are_tensorflows() {
        let limits = bucket_limits();
        let h = histogram(&[1e-39, 3.0, -3.0, 3.0]);
        let count_at = |limit: f64| h.bucket_limit.iter().position(|&l| l == limit).map(|i| h.bucket[i]);
        assert_eq!(count_at(1e-12), Some(1.0));
        let above_three = *limits.iter().find(|&&l| l >= 3.0).unwrap();
        assert_eq!(count_at(above_three), Some(2.0));
        assert_eq!(h.bucket.iter().sum::<f64>(), 4.0);
        assert!(h.bucket_limit.windows(2).all(|w| w[0] < w[1]));
    }
}
