//! Data-parallel ranks over MPI (Open MPI or any MPI-3 library, through the `mpi` crate).
//!
//! Gradients travel by non-blocking all-reduce (`MPI_Iallreduce`), each started the moment
//! backward finishes its tensor: the top (FC) layers' large gradients are on the wire while
//! the convolutions below still compute. MPI moves a non-blocking collective forward only
//! inside MPI calls, so a progress thread tests the pending requests every 50 us while there
//! are any (calls are serialised by one lock: `MPI_THREAD_SERIALIZED`); without it a ring
//! all-reduce would advance only at layer boundaries. A started gradient's buffer moves out of
//! its `Param` into the request, so nothing can read or write it while MPI owns it;
//! `finish_gradients` moves the sum back.
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
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

pub struct MpiCluster {
    rank: usize,
    ranks: usize,
    timeout: Duration,
    recovery_note: String,
    /// The gradients' requests; holding this lock is the right to call MPI.
    mpi: Arc<Mutex<Requests>>,
    progress: Option<(Arc<AtomicBool>, JoinHandle<()>)>,
    /// Gradients being summed, in the order they were started (as their requests are).
    in_flight: Vec<InFlight>,
    /// Per parameter, the buffer its next sum is received into (last step's sent gradient).
    spare: Vec<Vec<f32>>,
    gradient_wait: Duration,
    /// Finalises MPI when dropped: declared last, so it drops after the progress thread ends.
    _universe: mpi::environment::Universe,
}

/// Pending requests, one contiguous array as `MPI_Testall` takes them.
struct Requests(Vec<ffi::MPI_Request>);

// SAFETY: a request is a handle MPI lets any thread use under MPI_THREAD_SERIALIZED, which the
// mutex around it provides.
unsafe impl Send for Requests {}

impl Requests {
    /// Test them all (driving their progress); true when all are complete (they are then
    /// freed and read as null requests, which test as complete).
    fn test_all(&mut self) -> bool {
        let mut done: c_int = 0;
        // SAFETY: valid or null requests; statuses ignored.
        unsafe { ffi::MPI_Testall(count(self.0.len()), self.0.as_mut_ptr(), &mut done, ffi::RSMPI_STATUSES_IGNORE) };
        done != 0
    }
}

/// Test the pending requests every 50 us while there are any, until `stop`.
fn progress_loop(mpi: Arc<Mutex<Requests>>, stop: Arc<AtomicBool>) {
    while !stop.load(Ordering::Relaxed) {
        let pending = {
            let mut requests = mpi.lock().unwrap_or_else(|e| e.into_inner());
            !requests.0.is_empty() && !requests.test_all()
        };
        std::thread::sleep(Duration::from_micros(if pending { 50 } else { 1000 }));
    }
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

/// `Element` for Rust types and the MPI datatype constants that match them.
macro_rules! elements {
    ($($t:ty => $datatype:ident),*) => {$(
        impl Element for $t {
            fn datatype() -> ffi::MPI_Datatype {
                // SAFETY: a constant the library initialised.
                unsafe { ffi::$datatype }
            }
        }
    )*};
}

elements!(f32 => RSMPI_FLOAT, f64 => RSMPI_DOUBLE, u64 => RSMPI_UINT64_T, u8 => RSMPI_UINT8_T);

fn count(len: usize) -> c_int {
    // The largest tensor (the paper model's fc6, 37.7M weights) is far below 2^31.
    c_int::try_from(len).expect("an MPI message of fewer than 2^31 elements")
}

/// Start summing (or `op`-reducing) `sent` over the ranks into `result`.
///
/// # Safety
/// Both buffers' memory must stay allocated and untouched until the request completes
/// (moving a `Vec` that owns it is fine).
unsafe fn start_all_reduce<T: Element>(sent: &[T], result: &mut [T], op: ffi::MPI_Op, request: &mut ffi::MPI_Request) {
    assert_eq!(sent.len(), result.len());
    // SAFETY: the caller keeps both buffers for the request's lifetime.
    unsafe {
        ffi::MPI_Iallreduce(
            sent.as_ptr().cast::<c_void>(),
            result.as_mut_ptr().cast::<c_void>(),
            count(sent.len()),
            T::datatype(),
            op,
            world(),
            request,
        )
    };
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
    /// Initialise MPI for this process (`mpirun` started it). MPI is called from this thread
    /// and the progress thread, one at a time (under `mpi`'s lock); never from compute threads.
    pub fn start(timeout: Duration) -> Result<MpiCluster> {
        let (universe, threading) = mpi::initialize_with_threading(mpi::Threading::Serialized).context("MPI was already initialised")?;
        let world = universe.world();
        let (rank, ranks) = (world.rank() as usize, world.size() as usize);
        let mpi = Arc::new(Mutex::new(Requests(Vec::new())));
        // An MPI library without thread support still works, progressing only at layer ends.
        let progress = (threading >= mpi::Threading::Serialized).then(|| {
            let stop = Arc::new(AtomicBool::new(false));
            let (m, s) = (mpi.clone(), stop.clone());
            (stop, crate::denormals::spawn("mpi-progress", move || progress_loop(m, s)).expect("spawn a thread"))
        });
        Ok(MpiCluster {
            rank,
            ranks,
            timeout,
            recovery_note: String::new(),
            mpi,
            progress,
            in_flight: Vec::new(),
            spare: Vec::new(),
            gradient_wait: Duration::ZERO,
            _universe: universe,
        })
    }

    fn lock(&self) -> MutexGuard<'_, Requests> {
        self.mpi.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Poll until `requests` (the gradients' when `None`) are all complete. Past the timeout
    /// (unless `patient`) the job cannot go on (the requests still own their buffers), so this
    /// rank reports and aborts every rank.
    fn wait(&self, mut requests: Option<&mut Requests>, what: &str, patient: bool) {
        let started = Instant::now();
        loop {
            let done = match requests.as_deref_mut() {
                Some(r) => {
                    let _mpi = self.lock();
                    r.test_all()
                }
                None => self.lock().test_all(),
            };
            if done {
                return;
            }
            let waited = started.elapsed();
            if !patient && waited > self.timeout {
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
            if waited > Duration::from_secs(1) {
                std::thread::sleep(Duration::from_millis(5));
            } else if waited > Duration::from_millis(2) {
                std::thread::sleep(Duration::from_micros(100));
            } else {
                std::thread::yield_now();
            }
        }
    }

    /// Start one collective with `start` (under the MPI lock) and wait for it. The buffers
    /// `start` hands to MPI must outlive this call, which completes the request.
    fn one_collective(&self, what: &str, patient: bool, start: impl FnOnce(&mut ffi::MPI_Request)) {
        let mut request = Requests(vec![null_request()]);
        {
            let _mpi = self.lock();
            start(&mut request.0[0]);
        }
        self.wait(Some(&mut request), what, patient);
    }

    fn broadcast<T: Element>(&mut self, data: &mut [T], what: &str) {
        self.one_collective(what, false, |request| {
            // SAFETY: `data` is borrowed until the request completes.
            unsafe { ffi::MPI_Ibcast(data.as_mut_ptr().cast::<c_void>(), count(data.len()), T::datatype(), 0, world(), request) };
        });
    }

    fn all_reduce<T: Element>(&mut self, values: &mut [T], op: ffi::MPI_Op, what: &str) {
        let sent = values.to_vec();
        // SAFETY: `sent` and `values` outlive the request.
        self.one_collective(what, false, |request| unsafe { start_all_reduce(&sent, values, op, request) });
    }
}

impl Drop for MpiCluster {
    fn drop(&mut self) {
        if let Some((stop, thread)) = self.progress.take() {
            stop.store(true, Ordering::Relaxed);
            let _ = thread.join();
        }
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
        let mut mpi = self.lock();
        // SAFETY: both buffers move into `in_flight` and stay there, untouched and not
        // reallocated, until `finish_gradients` has completed the request.
        unsafe { start_all_reduce(&sent, &mut sum, ffi::RSMPI_SUM, &mut request) };
        mpi.0.push(request);
        drop(mpi);
        self.in_flight.push(InFlight { index, sent, sum });
    }

    fn layer_done(&mut self) {
        if self.progress.is_none() {
            let mut requests = self.lock();
            if !requests.0.is_empty() {
                requests.test_all();
            }
        }
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

    fn rendezvous(&mut self, what: &str) -> Result<()> {
        // SAFETY: a barrier has no buffers.
        self.one_collective(what, true, |request| unsafe {
            ffi::MPI_Ibarrier(world(), request);
        });
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
        let started = Instant::now();
        self.wait(None, "the gradient all-reduce", false);
        self.gradient_wait += started.elapsed();
        self.lock().0.clear();
        if self.in_flight.len() != params.len() {
            bail!("{} of the model's {} gradients were sent this step", self.in_flight.len(), params.len());
        }
        let scale = 1.0 / self.ranks as f32;
        for InFlight { index, sent, mut sum } in self.in_flight.drain(..) {
            sum.par_chunks_mut(1 << 15).for_each(|c| c.iter_mut().for_each(|g| *g *= scale));
            params[index].grad = sum;
            self.spare[index] = sent;
        }
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
        let _mpi = self.lock();
        // SAFETY: ends the process (and, through mpirun, every rank).
        unsafe { ffi::MPI_Abort(world(), 1) };
        std::process::abort();
    }
}
