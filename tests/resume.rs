//! Stopping a real training process at any instant, by signal or by SIGKILL, and resuming it
//! ends with the same weights, bit for bit, as a run that was never stopped.

mod support;

use alexnet::checkpoint;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use support::Setup;

fn setup() -> Setup {
    support::setup(256, 256)
}

/// 3 epochs of 32 steps, a checkpoint every 4 steps.
fn fresh_args(s: &Setup, out: &Path) -> Vec<String> {
    let args = ["train", "--batch-size", "8", "--epochs", "3", "--checkpoint-every", "4", "--display-step", "4", "--seed", "7"];
    let mut v: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    v.extend(["--threads", "2", "--eval-batch", "64", "--data"].map(String::from));
    v.push(s.data.display().to_string());
    v.push("--out".into());
    v.push(out.display().to_string());
    v
}

fn spawn(args: &[String]) -> Child {
    Command::new(env!("CARGO_BIN_EXE_alexnet")).args(args).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap()
}

fn resume_args(out: &Path) -> Vec<String> {
    vec!["train".into(), "--resume".into(), out.display().to_string()]
}

fn weights(path: &Path) -> Vec<Vec<f32>> {
    checkpoint::load(path, None).unwrap().params.into_iter().map(|p| p.value).collect()
}

fn steps_logged(run: &Path) -> Vec<u64> {
    let text = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    text.lines()
        .filter(|l| l.contains("\"loss\""))
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["step"].as_u64().unwrap())
        .collect()
}

fn reference(s: &Setup) -> PathBuf {
    let out = s.root.join("reference");
    let done = spawn(&fresh_args(s, &out)).wait_with_output().unwrap();
    assert!(done.status.success(), "{}", String::from_utf8_lossy(&done.stderr));
    out
}

#[test]
#[cfg_attr(debug_assertions, ignore = "release only: run `cargo test --release` (trains real models)")]
fn sigint_and_sigterm_checkpoint_and_the_resumed_run_is_bit_identical() {
    let s = setup();
    let reference = reference(&s);
    let out = s.root.join("interrupted");
    let mut args = fresh_args(&s, &out);
    for signal in ["INT", "TERM"] {
        let child = spawn(&args);
        // Wait for the run to be under way (its first checkpoint), then signal it.
        let ckpt = out.join("checkpoint.safetensors");
        let modified = ckpt.metadata().and_then(|m| m.modified()).ok();
        let deadline = Instant::now() + Duration::from_secs(60);
        while ckpt.metadata().and_then(|m| m.modified()).ok() == modified && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        let killed = Command::new("kill").args([format!("-{signal}"), child.id().to_string()]).status().unwrap();
        assert!(killed.success());
        let done = child.wait_with_output().unwrap();
        let stdout = String::from_utf8_lossy(&done.stdout);
        assert_eq!(done.status.code(), Some(if signal == "INT" { 130 } else { 143 }), "{stdout}");
        assert!(stdout.contains(&format!("Interrupted by SIG{signal} at step")) && stdout.contains("--resume"), "{stdout}");
        args = resume_args(&out);
    }
    let done = spawn(&args).wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&done.stdout);
    assert!(done.status.success() && stdout.contains("Resuming at step"), "{stdout}");
    assert!(weights(&out.join("model.safetensors")) == weights(&reference.join("model.safetensors")), "resumed weights differ");
    assert_eq!(steps_logged(&out), steps_logged(&reference), "metrics after a resume");
}

#[test]
#[cfg_attr(debug_assertions, ignore = "release only: run `cargo test --release` (trains real models)")]
fn sigkill_at_any_instant_leaves_a_valid_checkpoint_and_resuming_is_bit_identical() {
    let s = setup();
    let reference = reference(&s);
    let out = s.root.join("killed");
    // Kill after these delays (ms), in turn, until a run gets to finish on its own.
    let delays = [40, 700, 130, 950, 420, 260, 1300, 80, 610];
    let mut kills = 0;
    for round in 0.. {
        let args = if out.join("config.json").exists() { resume_args(&out) } else { fresh_args(&s, &out) };
        let mut child = spawn(&args);
        let delay = Duration::from_millis(delays.get(round).copied().unwrap_or(60_000));
        let started = Instant::now();
        let finished = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break Some(status);
            }
            if started.elapsed() >= delay {
                break None;
            }
            std::thread::sleep(Duration::from_millis(2));
        };
        match finished {
            Some(status) => {
                let done = child.wait_with_output().unwrap();
                assert!(status.success(), "{}", String::from_utf8_lossy(&done.stderr));
                break;
            }
            None => {
                child.kill().unwrap(); // SIGKILL
                child.wait().unwrap();
                kills += 1;
                let ckpt = out.join("checkpoint.safetensors");
                if ckpt.exists() {
                    // Whatever instant the kill hit, the checkpoint on disk is whole.
                    weights(&ckpt);
                }
            }
        }
    }
    assert!(kills >= 3, "only {kills} kills landed before the run finished");
    assert!(weights(&out.join("model.safetensors")) == weights(&reference.join("model.safetensors")), "resumed weights differ");
    assert_eq!(steps_logged(&out), steps_logged(&reference), "metrics after resumes");
}
