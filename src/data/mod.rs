//! Data: the IDX reader, MNIST, and batch assembly with augmentation.
pub mod augment;
pub mod batch;
pub mod folder;
pub mod idx;
pub mod mnist;
pub mod pipeline;
pub mod source;

/// Decode a PNG or JPEG held in memory, refusing images over `max_side` pixels a side or
/// `max_alloc` bytes of decoding memory, so a small hostile file cannot claim huge memory.
pub fn decode_image(bytes: &[u8], max_side: u32, max_alloc: u64) -> anyhow::Result<image::DynamicImage> {
    use anyhow::Context;
    let mut reader = image::ImageReader::new(std::io::Cursor::new(bytes)).with_guessed_format().context("cannot read image data")?;
    let mut limits = image::Limits::default();
    (limits.max_image_width, limits.max_image_height, limits.max_alloc) = (Some(max_side), Some(max_side), Some(max_alloc));
    reader.limits(limits);
    reader.decode().map_err(|e| match e {
        image::ImageError::Limits(_) => {
            anyhow::anyhow!("larger than {max_side}x{max_side} pixels or {} MiB of decoding memory", max_alloc >> 20)
        }
        e => anyhow::Error::new(e).context("not a readable PNG or JPEG"),
    })
}
