//! Data-parallel training over MPI, with real `mpirun` jobs of two ranks on this machine
//! (`cargo test --release --features mpi --test mpi`; needs Open MPI).
#![cfg(feature = "mpi")]

mod support;

use alexnet::checkpoint;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};
use support::Setup;

/// One job at a time: two of them on two cores would make each rank's waits (and so the
/// timeout test) depend on the other test's load.
static ONE_JOB_AT_A_TIME: Mutex<()> = Mutex::new(());

fn setup() -> Setup {
    support::setup(1024, 256)
}

/// `alexnet --threads 1 ARGS`, alone or as `ranks` ranks of an `mpirun` job. `tag` marks the
/// ranks' environment so a test can find their processes.
fn command(ranks: usize, tag: &str, args: &[&str]) -> Command {
    let exe = env!("CARGO_BIN_EXE_alexnet");
    let mut c = if ranks == 1 {
        Command::new(exe)
    } else {
        let mut c = Command::new("mpirun");
        c.args(["-np", &ranks.to_string(), "--oversubscribe", "-x", "ALEXNET_TEST_TAG", exe]);
        c
    };
    // Open MPI refuses to run as root (CI containers) unless told it is intended.
    c.env("OMPI_ALLOW_RUN_AS_ROOT", "1").env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1").env("ALEXNET_TEST_TAG", tag);
    c.args(["--threads", "1"]).args(args).stdout(Stdio::piped()).stderr(Stdio::piped());
    c
}

fn run(ranks: usize, args: &[&str]) -> Output {
    let out = command(ranks, "run", args).output().expect("mpirun (Open MPI) must be installed for the mpi feature's tests");
    assert!(out.status.success(), "{ranks} rank(s) {args:?}:\n{}\n{}", text(&out.stdout), text(&out.stderr));
    out
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// `steps` steps of `batch` (global) samples.
fn train_args(s: &Setup, out: &Path, batch: usize, steps: usize, extra: &[&str]) -> Vec<String> {
    let mut v: Vec<String> = ["train", "--display-step", "1", "--seed", "3", "--data"].map(String::from).to_vec();
    v.push(s.data.display().to_string());
    v.extend(["--out".into(), out.display().to_string(), "--batch-size".into(), batch.to_string()]);
    v.extend(["--samples".into(), (batch * steps).to_string()]);
    v.extend(extra.iter().map(|a| a.to_string()));
    v
}

fn as_strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

fn weights(run: &Path) -> Vec<(String, Vec<f32>)> {
    checkpoint::load(&run.join("model.safetensors"), None).unwrap().params.into_iter().map(|p| (p.name, p.value)).collect()
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

#[test]
fn two_ranks_of_32_give_the_weights_of_one_process_of_64() {
    let _one = ONE_JOB_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let s = setup();
    // Dropout (keep 0.8) and the shift augmentation on: both draw per global sample. One
    // convolution algorithm for both runs: measured, a rank's batch of 32 may get another than
    // the process's 64 (on a Zen 3 EPYC conv3's forward: im2col at 32, Winograd at 64), whose
    // rounding differs by more than the reassociation this test bounds.
    let extra = ["--optimizer", "sgd", "--lr", "0.01", "--augment", "--conv-algo", "im2col"];
    let (one, before_last, two) = (s.root.join("one"), s.root.join("one-short"), s.root.join("two"));
    run(1, &as_strs(&train_args(&s, &one, 64, 3, &extra)));
    run(1, &as_strs(&train_args(&s, &before_last, 64, 2, &extra)));
    let job = run(2, &as_strs(&train_args(&s, &two, 64, 3, &extra)));
    let stdout = text(&job.stdout);
    assert!(stdout.contains("data-parallel over 2 MPI ranks (32 samples each per step"), "{stdout}");
    assert_eq!(stdout.matches("Testing Accuracy").count(), 1, "rank 0 alone reports:\n{stdout}");
    assert_eq!(stdout.matches("Iter ").count(), 3, "{stdout}");
    let config: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(two.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["ranks"], 2);
    // Float reassociation (two partial sums instead of one) is all that differs: the gap must
    // be a tiny fraction of what one step moves each tensor. A wrong shard, mask or average
    // is off by the size of a step.
    let (a, b, prev) = (weights(&one), weights(&two), weights(&before_last));
    for (((name, a), (_, b)), (_, prev)) in a.iter().zip(&b).zip(&prev) {
        let (gap, step) = (max_diff(a, b), max_diff(a, prev));
        assert!(step > 0.0 && gap <= 0.01 * step, "{name}: 2 ranks differ by {gap}, one step moves it by {step}");
    }
    // The same minibatch losses, step by step.
    let losses = |run: &Path| -> Vec<f64> {
        std::fs::read_to_string(run.join("metrics.jsonl"))
            .unwrap()
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["loss"].as_f64())
            .collect()
    };
    let (la, lb) = (losses(&one), losses(&two));
    assert_eq!(la.len(), lb.len());
    la.iter().zip(&lb).for_each(|(x, y)| assert!((x - y).abs() < 1e-4, "loss {x} vs {y}"));

    let bad = command(2, "bad", &as_strs(&train_args(&s, &s.root.join("odd"), 63, 3, &[]))).output().unwrap();
    assert!(!bad.status.success());
    assert!(text(&bad.stderr).contains("--batch-size 63 does not split evenly over 2 ranks"), "{}", text(&bad.stderr));
}

/// The process of rank `rank` among the ranks whose environment carries `tag`.
fn rank_pid(tag: &str, rank: usize) -> Option<u32> {
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
        let pid: u32 = e.file_name().to_str()?.parse().ok()?;
        let env = std::fs::read(e.path().join("environ")).ok()?;
        let vars: Vec<&[u8]> = env.split(|&b| b == 0).collect();
        let has = |v: String| vars.contains(&v.as_bytes());
        (has(format!("ALEXNET_TEST_TAG={tag}")) && has(format!("OMPI_COMM_WORLD_RANK={rank}"))).then_some(pid)
    })
}

fn wait_with_deadline(mut child: Child, limit: Duration) -> Output {
    let started = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if started.elapsed() > limit {
            let _ = child.kill();
            panic!("the job did not end within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    child.wait_with_output().unwrap()
}

#[test]
fn a_stopped_rank_ends_the_job_with_a_clear_error_and_the_run_resumes_bit_for_bit() {
    let _one = ONE_JOB_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let s = setup();
    let steps = 40;
    let extra = ["--checkpoint-every", "2", "--mpi-timeout", "5"];
    let reference = s.root.join("reference");
    run(2, &as_strs(&train_args(&s, &reference, 64, steps, &extra)));

    let out = s.root.join("stopped");
    let tag = format!("stop-{}", std::process::id());
    let job = command(2, &tag, &as_strs(&train_args(&s, &out, 64, steps, &extra))).spawn().unwrap();
    let started = Instant::now();
    while !out.join("checkpoint.safetensors").exists() {
        assert!(started.elapsed() < Duration::from_secs(60), "no checkpoint written");
        std::thread::sleep(Duration::from_millis(10));
    }
    // A hung rank (stopped, so it neither answers nor exits): MPI alone would wait forever.
    let pid = rank_pid(&tag, 1).expect("rank 1's process");
    let stopped_at = Instant::now();
    Command::new("kill").args(["-STOP", &pid.to_string()]).status().unwrap();
    let ended = wait_with_deadline(job, Duration::from_secs(60));
    let waited = stopped_at.elapsed();
    let _ = Command::new("kill").args(["-KILL", &pid.to_string()]).status();
    let stderr = text(&ended.stderr);
    assert!(!ended.status.success());
    assert!(stderr.contains("no answer from the other ranks for 5 s"), "{stderr}");
    assert!(stderr.contains(&format!("alexnet train --resume {}", out.display())), "{stderr}");
    assert!(waited < Duration::from_secs(40), "ended {waited:?} after the stop");

    let resumed = run(2, &["train", "--resume", out.to_str().unwrap()]);
    assert!(text(&resumed.stdout).contains("Resuming at step"), "{}", text(&resumed.stdout));
    assert!(weights(&reference) == weights(&out), "resumed weights differ from the uninterrupted run's");
}
