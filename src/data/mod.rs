//! Data: the IDX reader, MNIST, and batch assembly with augmentation.
pub mod augment;
pub mod batch;
pub mod idx;
pub mod mnist;
