//! AlexNet in Rust: a purpose-built CPU training engine for AlexNet-family networks.
//!
//! `layers` holds the numeric kernels (forward/backward pairs over preallocated buffers),
//! `model` the fixed layer stacks, `data` the MNIST pipeline, `optim` Adam and SGD, `train`,
//! `eval`, `predict` and `bench` the commands (`roofline`: the GEMM ceiling `bench` compares
//! with), `checkpoint` the PyTorch-compatible files, `cluster` data-parallel training over MPI.
pub mod architectures;
pub mod autotune;
pub mod bench;
pub mod cache_dir;
pub mod checkpoint;
pub mod cluster;
pub mod config;
pub mod data;
pub mod denormals;
pub mod eval;
pub mod features;
pub mod files;
pub mod layers;
pub mod model;
pub mod neighbours;
pub mod onnx;
pub mod onnx_graph;
pub mod optim;
pub mod plot;
pub mod predict;
pub mod rng;
pub mod roofline;
pub mod run_dir;
pub mod run_lock;
pub mod schedule;
pub mod steal;
pub mod summary;
pub mod tensorboard;
pub mod train;
