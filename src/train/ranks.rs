//! What a data-parallel job adds to training, as hooks the loop calls (each a no-op, or nearly,
//! with one process): rank 0 decides (the starting point, the schedule, the convolution
//! algorithms, when to stop) and every rank takes its decision, so the replicas stay identical.

use crate::autotune::{self, RunPlans};
use crate::cluster::{Cluster, fingerprint};
use crate::config::TrainConfig;
use crate::model::Model;
use crate::optim::Optimizer;
use crate::run_dir::Start;
use crate::schedule::Plateau;
use anyhow::{Context, Result, bail};

/// Every rank takes rank 0's weights, optimiser state and starting point (fresh or resumed),
/// so the replicas start identical.
pub fn share_start(cluster: &mut dyn Cluster, model: &mut Model, opt: &mut Optimizer, start: &mut Start) -> Result<()> {
    if cluster.ranks() == 1 {
        return Ok(());
    }
    // Opening the data may take any time (computing an ImageFolder's statistics): no timeout
    // applies until every rank has.
    cluster.rendezvous("every rank to open its data")?;
    for p in &mut model.params {
        cluster.broadcast_f32(&mut p.value, "rank 0's weights")?;
    }
    for slot in opt.slot1.iter_mut().chain(&mut opt.slot2) {
        cluster.broadcast_f32(slot, "rank 0's optimiser state")?;
    }
    let mut scalars = [start.step as f64, start.elapsed, opt.step as f64];
    cluster.broadcast_f64(&mut scalars, "rank 0's starting step")?;
    let [step, elapsed, opt_step] = scalars;
    (start.step, start.elapsed, opt.step) = (step as usize, elapsed, opt_step as u64);
    share_plateau(cluster, &mut start.plateau, "rank 0's schedule state")
}

/// Rank 0's plateau-schedule state on every rank (only rank 0 evaluates, so only it decides).
pub fn share_plateau(cluster: &mut dyn Cluster, plateau: &mut Plateau, what: &str) -> Result<()> {
    if cluster.ranks() == 1 {
        return Ok(());
    }
    let mut state = [plateau.scale as f64, plateau.best_error as f64, plateau.stale_epochs as f64];
    cluster.broadcast_f64(&mut state, what)?;
    *plateau = Plateau { scale: state[0] as f32, best_error: state[1] as f32, stale_epochs: state[2] as usize };
    Ok(())
}

/// A signal on any rank stops every rank at the same step (`mpirun` may deliver it to them at
/// different instants); a rank that saw none reports SIGTERM, what `mpirun` forwards.
pub fn agree_on_stop(cluster: &mut dyn Cluster, signal: usize) -> Result<usize> {
    if cluster.ranks() == 1 {
        return Ok(signal);
    }
    let mut stopping = [(signal != 0) as u8 as f64];
    cluster.sum_f64(&mut stopping, "the stop check")?;
    Ok(if stopping[0] == 0.0 {
        0
    } else if signal != 0 {
        signal
    } else {
        15
    })
}

/// The run's convolution algorithms and where they came from: a resumed run reads the ones it
/// started with; a new run has rank 0 choose them (`autotune::choose`), save them in the run
/// directory and share them, so every rank runs the same arithmetic.
pub fn conv_plans(
    cfg: &TrainConfig,
    resume: bool,
    model: &Model,
    local_batch: usize,
    cluster: &mut dyn Cluster,
) -> Result<(RunPlans, String)> {
    let mut bytes = Vec::new();
    let mut source = String::from("rank 0's");
    if cluster.rank() == 0 {
        let plans = if resume && cfg.out.join(autotune::RUN_FILE).exists() {
            source = format!("as saved in {}", cfg.out.join(autotune::RUN_FILE).display());
            RunPlans::read(&cfg.out)?
        } else {
            let cache = cfg.resolved_cache_dir();
            let training = autotune::choose(model, local_batch, true, cfg.conv.conv_algo, cache.as_deref())?;
            let evaluation = autotune::choose(model, cfg.eval_batch, false, cfg.conv.conv_algo, cache.as_deref())?;
            source = training.source.clone();
            let plans = RunPlans {
                training_batch: local_batch,
                training: autotune::named_plan(model, &training.plan),
                evaluation_batch: cfg.eval_batch,
                evaluation: autotune::named_plan(model, &evaluation.plan),
            };
            plans.write(&cfg.out)?;
            plans
        };
        bytes = serde_json::to_vec(&plans)?;
    }
    if cluster.ranks() > 1 {
        // Measuring can take longer than --mpi-timeout (large layers, big evaluation batches):
        // the ranks meet without a deadline first, as after opening the data.
        cluster.rendezvous("rank 0 to choose the convolution algorithms")?;
    }
    cluster.broadcast_bytes(&mut bytes, "rank 0's convolution algorithms")?;
    Ok((serde_json::from_slice(&bytes).context("rank 0's convolution algorithms")?, source))
}

/// Every rank holds the same weights (they must stay identical); else the job stops.
pub fn check_replicas(cluster: &mut dyn Cluster, model: &Model, step: usize) -> Result<()> {
    if !cluster.all_equal(fingerprint(&model.params), "the replicas' weight fingerprints")? {
        bail!("step {step}: the ranks' weights differ (they must stay identical); the checkpoint is rank 0's");
    }
    Ok(())
}
