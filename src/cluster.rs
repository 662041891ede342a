//! The processes of one training run. One process by default; built with the `mpi` feature and
//! started by `mpirun -np N`, N data-parallel ranks: each computes the gradient of its share of
//! every batch, the gradients are averaged by all-reduce while the backward pass goes on, and
//! every rank applies the same update to the same weights, so the replicas stay identical
//! (checked at every checkpoint). Rank 0 alone prints, evaluates and writes files.

#[cfg(feature = "mpi")]
mod mpi_world;

#[cfg(feature = "mpi")]
pub use mpi_world::MpiCluster;

use crate::model::{GradientReady, Param};
use anyhow::Result;
use rayon::prelude::*;

/// What training needs from the other ranks. Every call is collective: all ranks make it, in
/// the same order. A rank that does not answer within the timeout ends the whole job with an
/// error naming what was being waited for (see `MpiCluster`).
pub trait Cluster: GradientReady {
    fn rank(&self) -> usize;
    fn ranks(&self) -> usize;
    /// Overwrite `data` on every rank with rank 0's.
    fn broadcast_f32(&mut self, data: &mut [f32], what: &str) -> Result<()>;
    fn broadcast_f64(&mut self, data: &mut [f64], what: &str) -> Result<()>;
    /// Rank 0's bytes, of rank 0's length, on every rank.
    fn broadcast_bytes(&mut self, data: &mut Vec<u8>, what: &str) -> Result<()>;
    /// Wait with no deadline until every rank gets here: for phases no timeout can bound,
    /// such as each rank preparing its data (a first pass over an ImageFolder dataset computes
    /// its statistics, hours on ImageNet). A rank that dies meanwhile is noticed by `mpirun`.
    fn rendezvous(&mut self, what: &str) -> Result<()>;
    /// Element-wise sum over the ranks, in place.
    fn sum_f64(&mut self, values: &mut [f64], what: &str) -> Result<()>;
    /// Whether every rank passed the same `value`.
    fn all_equal(&mut self, value: u64, what: &str) -> Result<bool>;
    /// Wait for the gradients `GradientReady::ready` started sending; afterwards every
    /// `Param::grad` holds the mean over the ranks.
    fn finish_gradients(&mut self, params: &mut [Param]) -> Result<()>;
    /// Seconds spent so far in `finish_gradients` waiting for gradients still on the wire:
    /// the communication the backward pass did not hide.
    fn gradient_wait_seconds(&self) -> f64 {
        0.0
    }
    /// What to tell the user if the run dies waiting for another rank (where its last
    /// checkpoint is); rank 0 updates it after each checkpoint.
    fn set_recovery_note(&mut self, note: String);
    /// End every rank of the job after this one failed (so none waits for it in vain).
    fn abort_all(&self) {}
}

/// A run of one process: every collective is the identity, and a finished gradient needs no
/// sending.
pub struct Single;

impl GradientReady for Single {
    fn ready(&mut self, _: usize, _: &mut Param) {}
}

impl Cluster for Single {
    fn rank(&self) -> usize {
        0
    }
    fn ranks(&self) -> usize {
        1
    }
    fn broadcast_f32(&mut self, _: &mut [f32], _: &str) -> Result<()> {
        Ok(())
    }
    fn broadcast_f64(&mut self, _: &mut [f64], _: &str) -> Result<()> {
        Ok(())
    }
    fn broadcast_bytes(&mut self, _: &mut Vec<u8>, _: &str) -> Result<()> {
        Ok(())
    }
    fn rendezvous(&mut self, _: &str) -> Result<()> {
        Ok(())
    }
    fn sum_f64(&mut self, _: &mut [f64], _: &str) -> Result<()> {
        Ok(())
    }
    fn all_equal(&mut self, _: u64, _: &str) -> Result<bool> {
        Ok(true)
    }
    fn finish_gradients(&mut self, _: &mut [Param]) -> Result<()> {
        Ok(())
    }
    fn set_recovery_note(&mut self, _: String) {}
}

/// The number of processes `mpirun` (Open MPI, or MPICH's Hydra) started this one among, if
/// it did.
pub fn launched_ranks() -> Option<usize> {
    ["OMPI_COMM_WORLD_SIZE", "PMI_SIZE"].iter().find_map(|k| std::env::var(k).ok()?.parse().ok())
}

/// How many ranks of the job share this machine: they split its cores between them.
pub fn ranks_on_this_machine() -> usize {
    ["OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCALNRANKS"].iter().find_map(|k| std::env::var(k).ok()?.parse().ok()).unwrap_or(1).max(1)
}

/// The cluster this process belongs to: MPI ranks when `mpirun` started it with more than one
/// process, else a single process. `timeout` bounds every wait for another rank.
pub fn connect(timeout: std::time::Duration) -> Result<Box<dyn Cluster>> {
    match launched_ranks() {
        #[cfg(feature = "mpi")]
        Some(n) if n > 1 => Ok(Box::new(MpiCluster::start(timeout)?)),
        #[cfg(not(feature = "mpi"))]
        Some(n) if n > 1 => {
            let _ = timeout;
            anyhow::bail!(
                "mpirun started {n} processes, but this alexnet was built without MPI: build it with `cargo build --release --features mpi` (needs Open MPI's development files)"
            )
        }
        _ => Ok(Box::new(Single)),
    }
}

/// A hash of every weight's bits: equal on two ranks exactly when their replicas are (up to
/// 64-bit collisions). Per tensor in parallel, combined in order.
pub fn fingerprint(params: &[Param]) -> u64 {
    let hash_words = |h: u64, xs: &[f32]| xs.iter().fold(h, |h, x| (h ^ x.to_bits() as u64).wrapping_mul(0x0000_0100_0000_01B3));
    params
        .par_iter()
        .map(|p| p.value.chunks(1 << 16).fold(0xcbf2_9ce4_8422_2325, hash_words))
        .collect::<Vec<u64>>()
        .into_iter()
        .fold(0, |h, t| (h ^ t).wrapping_mul(0x9E37_79B9_7F4A_7C15).rotate_left(31))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(values: &[&[f32]]) -> Vec<Param> {
        values
            .iter()
            .map(|v| Param {
                name: "p".into(),
                torch_shape: vec![v.len()],
                layout: crate::layers::layer::ParamLayout::Same,
                value: v.to_vec(),
                grad: vec![0.0; v.len()],
                decay: true,
                lr_mult: 1.0,
            })
            .collect()
    }

    #[test]
    fn fingerprint_sees_any_change_to_any_weight() {
        let base = fingerprint(&params(&[&[1.0, 2.0], &[3.0]]));
        assert_eq!(base, fingerprint(&params(&[&[1.0, 2.0], &[3.0]])));
        assert_ne!(base, fingerprint(&params(&[&[1.0, 2.0], &[3.0000002]])), "one ulp");
        assert_ne!(base, fingerprint(&params(&[&[2.0, 1.0], &[3.0]])), "order within a tensor");
        assert_ne!(base, fingerprint(&params(&[&[3.0], &[1.0, 2.0]])), "order of tensors");
        assert_ne!(fingerprint(&params(&[&[0.0]])), fingerprint(&params(&[&[-0.0]])), "sign of zero");
    }
}
