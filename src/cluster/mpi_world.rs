//! Data-parallel ranks over MPI (Open MPI or any MPI-3 library, through the `mpi` crate).
//!
//! Gradients travel by non-blocking all-reduce (`MPI_Iallreduce`), each started the moment
//! backward finishes its tensor: the top (FC) layers' large gradients are on the wire while
//! the convolutions below still compute, and `layer_done` gives MPI a chance to progress them
//! between layers. A started gradient's buffer moves out of its `Param` into the request, so
//! nothing can read or write it while MPI owns it; `finish_gradients` moves the sum back.
//!
//! MPI has no timeouts: a collective whose peer died, hangs or was stopped waits forever.
//! Every wait here polls with a deadline instead; on expiry this rank says what it was
//! waiting for and where the last good checkpoint is, and aborts the job (`MPI_Abort`), which
//! ends every rank. (A rank that exits or crashes is also noticed by `mpirun`, which ends the
//! others itself.)

use super::Cluster;
use crate::model::{GradientReady, Param};
use anyhow::{Context, Result, bail};
use mpi::ffi;
use mpi::traits::Communicator;
use rayon::prelude::*;
use std::ffi::{c_int, c_void};
use std::time::{Duration, Instant};

pub struct MpiCluster {
    /// Finalises MPI when dropped.
    _universe: mpi::environment::Universe,
    rank: usize,
    ranks: usize,
    timeout: Duration,
    recovery_note: String,
    /// Gradients being summed, in the order they were started, and their requests (one
    /// contiguous array, as `MPI_Testall` takes them).
    in_flight: Vec<InFlight>,
    requests: Vec<ffi::MPI_Request>,
    /// Per parameter, the buffer its next sum is received into (last step's sent gradient).
    spare: Vec<Vec<f32>>,
    gradient_wait: Duration,
}

struct InFlight {
    index: usize,
    sent: Vec<f32>,
    sum: Vec<f32>,
}

/// An MPI element type.
trait Element: Copy {
    fn datatype() -> ffi::MPI_Datatype;
}

impl Element for f32 {
    fn datatype() -> ffi::MPI_Datatype {
        // SAFETY: a constant the library initialised.
        unsafe { ffi::RSMPI_FLOAT }
    }
}

impl Element for f64 {
    fn datatype() -> ffi::MPI_Datatype {
        // SAFETY: as above.
        unsafe { ffi::RSMPI_DOUBLE }
    }
}

impl Element for u64 {
    fn datatype() -> ffi::MPI_Datatype {
        // SAFETY: as above.
        unsafe { ffi::RSMPI_UINT64_T }
    }
}

impl Element for u8 {
    fn datatype() -> ffi::MPI_Datatype {
        // SAFETY: as above.
        unsafe { ffi::RSMPI_UINT8_T }
    }
}

fn count(len: usize) -> c_int {
    // The largest tensor (the paper model's fc6, 37.7M weights) is far below 2^31.
    c_int::try_from(len).expect("an MPI message of fewer than 2^31 elements")
}

fn world() -> ffi::MPI_Comm {
    // SAFETY: a constant the library initialised.
    unsafe { ffi::RSMPI_COMM_WORLD }
}

fn null_request() -> ffi::MPI_Request {
    // SAFETY: as above.
    unsafe { ffi::RSMPI_REQUEST_NULL }
}

impl MpiCluster {
    /// Initialise MPI for this process (`mpirun` started it). Only the calling thread makes
    /// MPI calls; the compute threads never do.
    pub fn start(timeout: Duration) -> Result<MpiCluster> {
        let (universe, _) = mpi::initialize_with_threading(mpi::Threading::Funneled).context("MPI was already initialised")?;
        let world = universe.world();
        let (rank, ranks) = (world.rank() as usize, world.size() as usize);
        Ok(MpiCluster {
            _universe: universe,
            rank,
            ranks,
            timeout,
            recovery_note: String::new(),
            in_flight: Vec::new(),
            requests: Vec::new(),
            spare: Vec::new(),
            gradient_wait: Duration::ZERO,
        })
    }

    /// Poll `requests` until all complete. Past the deadline the job cannot go on (the
    /// requests still own their buffers), so this rank reports and aborts every rank.
    fn wait(&self, requests: &mut [ffi::MPI_Request], what: &str) {
        let started = Instant::now();
        loop {
            let mut done: c_int = 0;
            // SAFETY: valid requests (or null ones); statuses ignored.
            unsafe { ffi::MPI_Testall(count(requests.len()), requests.as_mut_ptr(), &mut done, ffi::RSMPI_STATUSES_IGNORE) };
            if done != 0 {
                return;
            }
            let waited = started.elapsed();
            if waited > self.timeout {
                eprintln!(
                    "error: rank {} of {}: no answer from the other ranks for {} s while waiting for {what}: a rank has died, hangs or is stopped. Ending the job. {}",
                    self.rank,
                    self.ranks,
                    self.timeout.as_secs_f64(),
                    self.recovery_note
                );
                self.abort_all();
            }
            // Spin briefly (a peer is usually about to answer), then poll without hogging a core
            // that a compute thread or a waiting peer on the same machine could use.
            if waited > Duration::from_millis(2) {
                std::thread::sleep(Duration::from_micros(100));
            } else {
                std::thread::yield_now();
            }
        }
    }

    fn broadcast<T: Element>(&mut self, data: &mut [T], what: &str) {
        let mut request = null_request();
        // SAFETY: `data` is borrowed until the wait below completes the request.
        unsafe { ffi::MPI_Ibcast(data.as_mut_ptr().cast::<c_void>(), count(data.len()), T::datatype(), 0, world(), &mut request) };
        self.wait(std::slice::from_mut(&mut request), what);
    }

    fn all_reduce<T: Element>(&mut self, values: &mut [T], op: ffi::MPI_Op, what: &str) {
        let sent = values.to_vec();
        let mut request = null_request();
        // SAFETY: `sent` and `values` outlive the request, which the wait completes.
        unsafe {
            ffi::MPI_Iallreduce(
                sent.as_ptr().cast::<c_void>(),
                values.as_mut_ptr().cast::<c_void>(),
                count(values.len()),
                T::datatype(),
                op,
                world(),
                &mut request,
            )
        };
        self.wait(std::slice::from_mut(&mut request), what);
    }
}

impl GradientReady for MpiCluster {
    fn ready(&mut self, index: usize, param: &mut Param) {
        if self.spare.len() <= index {
            self.spare.resize_with(index + 1, Vec::new);
        }
        let sent = std::mem::take(&mut param.grad);
        let mut sum = std::mem::take(&mut self.spare[index]);
        sum.resize(sent.len(), 0.0);
        let mut request = null_request();
        // SAFETY: both buffers move into `in_flight` and stay there, untouched and not
        // reallocated, until `finish_gradients` has completed the request.
        unsafe {
            ffi::MPI_Iallreduce(
                sent.as_ptr().cast::<c_void>(),
                sum.as_mut_ptr().cast::<c_void>(),
                count(sent.len()),
                f32::datatype(),
                ffi::RSMPI_SUM,
                world(),
                &mut request,
            )
        };
        self.in_flight.push(InFlight { index, sent, sum });
        self.requests.push(request);
    }

    fn layer_done(&mut self) {
        if self.requests.is_empty() {
            return;
        }
        let mut done: c_int = 0;
        // SAFETY: valid requests; a test only drives progress (they are freed when all are done,
        // after which they read as null and `finish_gradients` finds them complete).
        unsafe { ffi::MPI_Testall(count(self.requests.len()), self.requests.as_mut_ptr(), &mut done, ffi::RSMPI_STATUSES_IGNORE) };
    }
}

impl Cluster for MpiCluster {
    fn rank(&self) -> usize {
        self.rank
    }

    fn ranks(&self) -> usize {
        self.ranks
    }

    fn broadcast_f32(&mut self, data: &mut [f32], what: &str) -> Result<()> {
        self.broadcast(data, what);
        Ok(())
    }

    fn broadcast_f64(&mut self, data: &mut [f64], what: &str) -> Result<()> {
        self.broadcast(data, what);
        Ok(())
    }

    fn broadcast_bytes(&mut self, data: &mut Vec<u8>, what: &str) -> Result<()> {
        let mut len = [data.len() as u64];
        self.broadcast(&mut len, what);
        data.resize(len[0] as usize, 0);
        self.broadcast(data, what);
        Ok(())
    }

    fn sum_f64(&mut self, values: &mut [f64], what: &str) -> Result<()> {
        // SAFETY: a constant the library initialised.
        self.all_reduce(values, unsafe { ffi::RSMPI_SUM }, what);
        Ok(())
    }

    fn all_equal(&mut self, value: u64, what: &str) -> Result<bool> {
        let (mut max, mut min) = ([value], [value]);
        // SAFETY: constants the library initialised.
        self.all_reduce(&mut max, unsafe { ffi::RSMPI_MAX }, what);
        self.all_reduce(&mut min, unsafe { ffi::RSMPI_MIN }, what);
        Ok(max == min)
    }

    fn finish_gradients(&mut self, params: &mut [Param]) -> Result<()> {
        let mut requests = std::mem::take(&mut self.requests);
        let started = Instant::now();
        self.wait(&mut requests, "the gradient all-reduce");
        self.gradient_wait += started.elapsed();
        if self.in_flight.len() != params.len() {
            bail!("{} of the model's {} gradients were sent this step", self.in_flight.len(), params.len());
        }
        let scale = 1.0 / self.ranks as f32;
        for InFlight { index, sent, mut sum } in self.in_flight.drain(..) {
            sum.par_chunks_mut(1 << 15).for_each(|c| c.iter_mut().for_each(|g| *g *= scale));
            params[index].grad = sum;
            self.spare[index] = sent;
        }
        self.requests = requests;
        self.requests.clear();
        Ok(())
    }

    fn gradient_wait_seconds(&self) -> f64 {
        self.gradient_wait.as_secs_f64()
    }

    fn set_recovery_note(&mut self, note: String) {
        self.recovery_note = note;
    }

    fn abort_all(&self) {
        use std::io::Write;
        let _ = std::io::stdout().flush();
        let _ = std::io::stderr().flush();
        // SAFETY: ends the process (and, through mpirun, every rank).
        unsafe { ffi::MPI_Abort(world(), 1) };
        std::process::abort();
    }
}
