//! Data: the IDX reader, MNIST, and batch assembly with augmentation.
pub mod augment;
pub mod batch;
pub mod folder;
pub mod idx;
pub mod mnist;
pub mod pipeline;
pub mod source;
