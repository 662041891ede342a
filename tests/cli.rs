//! The binary as a user meets it: bad input gets a clear error and a non-zero exit, and never
//! costs a good model file.

mod support;

use std::path::Path;
use support::{alexnet, fails_with};

#[test]
fn bad_flag_values_are_rejected_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let out = out.to_str().unwrap();
    fails_with(&["train", "--batch-size", "0", "--out", out], &["--batch-size"]);
    fails_with(&["train", "--keep-prob", "1.5", "--out", out], &["--keep-prob", "1.5"]);
    fails_with(&["train", "--keep-prob", "0", "--out", out], &["--keep-prob"]);
    fails_with(&["train", "--lr", "0", "--out", out], &["--lr"]);
    fails_with(&["train", "--lr", "-0.1", "--out", out], &["--lr"]);
    fails_with(&["train", "--model", "vgg", "--out", out], &["unknown model 'vgg'"]);
    fails_with(&["--threads", "0", "summary"], &["--threads"]);
    fails_with(&["train", "--data", "/nonexistent/mnist", "--out", out], &["/nonexistent/mnist", "does not exist"]);
    assert!(!Path::new(out).join("model.safetensors").exists());
}

/// Started by `mpirun -np 2` (its environment, without the job) but built without MPI: the
/// user learns how to build it, instead of getting two independent runs.
#[cfg(not(feature = "mpi"))]
#[test]
fn a_build_without_mpi_refuses_to_run_as_one_of_several_ranks() {
    let dir = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_alexnet"))
        .args(["train", "--out", dir.path().join("run").to_str().unwrap()])
        .env("OMPI_COMM_WORLD_SIZE", "2")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("--features mpi"), "{err}");
    assert!(!dir.path().join("run").exists());
}

#[test]
fn missing_or_mismatched_checkpoints_and_unreadable_images_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nope.safetensors");
    fails_with(&["eval", "--checkpoint", missing.to_str().unwrap()], &["nope.safetensors"]);
    let junk = dir.path().join("junk.safetensors");
    std::fs::write(&junk, b"definitely not safetensors").unwrap();
    fails_with(&["eval", "--checkpoint", junk.to_str().unwrap()], &["junk.safetensors"]);
    fails_with(&["predict", "--checkpoint", junk.to_str().unwrap(), "x.png"], &["junk.safetensors"]);
    let onnx = dir.path().join("out.onnx");
    fails_with(&["export", "--checkpoint", junk.to_str().unwrap(), "--onnx", onnx.to_str().unwrap()], &["junk.safetensors"]);
    assert!(!onnx.exists());
}

#[test]
fn resume_and_plot_need_a_run_directory_and_resume_takes_no_training_flags() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_str().unwrap();
    fails_with(&["train", "--resume", d], &["config.json", "run directory"]);
    fails_with(&["train", "--resume", d, "--lr", "0.1"], &["--resume", "--lr"]);
    // The algorithms are the run's (saved in it), so they cannot be changed on resume either.
    fails_with(&["train", "--resume", d, "--conv-algo", "im2col"], &["--resume", "--conv-algo"]);
    // Every training flag, with no list of them to keep: the config's own and the model-default ones.
    for flag in [&["--seed", "3"][..], &["--augment"], &["--shift", "1"], &["--batch-size", "8"], &["--out", d], &["--model", "alexnet"]] {
        let args: Vec<&str> = ["train", "--resume", d].iter().chain(flag).copied().collect();
        fails_with(&args, &["--resume", flag[0]]);
    }
    fails_with(&["plot", d], &["metrics.jsonl"]);
    // A checkpoint whose architecture asks for absurd sizes is refused before allocating.
    let arch = r#"{"name":"huge","input":[100000,100000,3],"layers":[{"Linear":{"name":"fc1","out":100000,"relu":false}}]}"#;
    let header = format!(r#"{{"__metadata__":{{"alexnet.architecture":{}}}}}"#, serde_json::to_string(arch).unwrap());
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend(header.as_bytes());
    let huge = dir.path().join("huge.safetensors");
    std::fs::write(&huge, bytes).unwrap();
    fails_with(&["eval", "--checkpoint", huge.to_str().unwrap()], &["huge.safetensors", "too large"]);
}

#[test]
fn failed_training_leaves_the_previous_model_untouched() {
    // A run directory with a good model, then a run into it that fails on its data.
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("model.safetensors");
    std::fs::write(&model, b"previous good model").unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir(&data).unwrap();
    std::fs::write(data.join("train-images-idx3-ubyte"), [0u8, 0, 8, 3, 0, 0]).unwrap();
    std::fs::write(data.join("train-labels-idx1-ubyte"), [0u8, 0, 8, 1, 0, 0, 0, 0]).unwrap();
    fails_with(
        &["train", "--data", data.to_str().unwrap(), "--out", dir.path().to_str().unwrap()],
        &["train-images-idx3-ubyte", "truncated"],
    );
    assert_eq!(std::fs::read(&model).unwrap(), b"previous good model");
}

#[test]
fn summary_prints_the_seed_model_table() {
    let out = alexnet(&["summary", "--model", "alexnet-mnist"]);
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("conv3") && text.contains("256x128x3x3") && text.contains("5624842 parameters"), "{text}");
}

/// Two runs with the same seed and inputs write the same model and checkpoint bytes (the
/// metadata's keys in a fixed order, no wall-clock time in them), and `summary --checkpoint`
/// names a file by its SHA-256.
#[test]
fn identical_runs_write_identical_model_files_and_summary_shows_their_checksum() {
    let s = support::setup(128, 64);
    let mut shas = Vec::new();
    for name in ["a", "b"] {
        let out = s.root.join(name);
        let args =
            ["train", "--data", s.data.to_str().unwrap(), "--out", out.to_str().unwrap(), "--samples", "128", "--conv-algo", "im2col"];
        let done = alexnet(&args);
        assert!(done.status.success(), "{}", String::from_utf8_lossy(&done.stderr));
        let summary = alexnet(&["summary", "--checkpoint", out.join("model.safetensors").to_str().unwrap()]);
        let text = String::from_utf8_lossy(&summary.stdout).to_string();
        assert!(summary.status.success() && text.contains("5624842 parameters"), "{text}");
        let sha = text.split("SHA-256 ").nth(1).and_then(|t| t.split_whitespace().next()).expect("a SHA-256").to_string();
        assert_eq!(sha.len(), 64, "{text}");
        let files = ["model.safetensors", "checkpoint.safetensors"].map(|f| std::fs::read(out.join(f)).unwrap());
        shas.push((sha, files));
    }
    assert!(shas[0].1[0] == shas[1].1[0], "the two model files differ");
    assert!(shas[0].1[1] == shas[1].1[1], "the two training checkpoints differ");
    assert_eq!(shas[0].0, shas[1].0);
    fails_with(&["summary", "--checkpoint", s.root.join("a/model.safetensors").to_str().unwrap(), "--model", "alexnet"], &["--model"]);
}

/// `bench --roofline --json`: the throughputs and the GEMM ceilings are there, the flops are the
/// seed model's (206.7 MFLOP per training sample, 69.2 per inference sample), and the GEMMs do
/// not run faster than the core's own FMA peak (which a wrong flop count or timer would show).
#[test]
fn bench_reports_throughput_and_the_gemm_ceiling() {
    let cache = tempfile::tempdir().unwrap();
    let cache = cache.path().to_str().unwrap();
    let args = ["--threads", "1", "bench", "--runs", "1", "--steps", "2", "--infer-batch", "50", "--json", "--cache-dir", cache];
    let out = alexnet(&[&args[..], &["--roofline", "--layers"]].concat());
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON object");
    assert!(r["train_samples_per_s"].as_f64().unwrap() > 0.0 && r["infer_samples_per_s"].as_f64().unwrap() > 0.0);
    let roofline = r["roofline"].as_array().unwrap();
    assert_eq!(roofline.len(), 2);
    let peak = r["fma_peak_gflops"].as_f64().unwrap();
    for (rf, batch, mflop) in [(&roofline[0], 64.0, 206.7), (&roofline[1], 50.0, 69.21)] {
        let gflop = rf["gflop"].as_f64().unwrap();
        assert!((gflop - batch * mflop / 1e3).abs() < 0.01 * gflop, "{rf}");
        let gemm = rf["one_core_gflops"].as_f64().unwrap();
        assert!(gemm > 0.0 && gemm < 1.5 * peak, "{rf} vs peak {peak}");
        assert!(rf["ceiling_samples_per_s"].as_f64().unwrap() > 0.0);
        // Per layer: the six layers with GEMMs (three convolutions, three fully connected).
        assert_eq!(rf["layer_ms"].as_array().unwrap().len(), 6, "{rf}");
    }
    // Each layer with GEMMs against its own training ceiling, timed in the same rounds.
    let layers: Vec<&str> = r["layer_ceiling"].as_array().unwrap().iter().map(|c| c["layer"].as_str().unwrap()).collect();
    assert_eq!(layers, ["conv1", "conv2", "conv3", "fc1", "fc2", "fc3"]);
    for c in r["layer_ceiling"].as_array().unwrap() {
        let (ratio, range) = (c["ratio"].as_f64().unwrap(), c["ratio_range"].as_array().unwrap());
        assert!(c["ceiling_ms"].as_f64().unwrap() > 0.0 && ratio > 0.0, "{c}");
        // The median round's ratio lies within the lowest and highest round's.
        let (low, high) = (range[0].as_f64().unwrap(), range[1].as_f64().unwrap());
        assert!(0.0 < low && low <= ratio && ratio <= high, "{c}");
    }
    // The ISA path, the flush-to-zero state and the measured algorithms are reported...
    assert!(["avx512", "avx2+fma", "scalar"].contains(&r["isa"].as_str().unwrap()), "{}", r["isa"]);
    if cfg!(any(target_arch = "x86_64", target_arch = "aarch64")) {
        assert_eq!(r["denormals_flushed"], true);
    }
    assert!(r["denormal_slowdown"].as_f64().unwrap() > 0.0);
    // ...with the hypervisor's steal during each timed run, where the system says (Linux).
    if std::fs::read_to_string("/proc/stat").is_ok() {
        for runs in ["train_runs_steal", "infer_runs_steal"] {
            let steal = r[runs].as_array().unwrap();
            assert_eq!(steal.len(), 1, "{runs}: one per timed run");
            assert!((0.0..=1.0).contains(&steal[0].as_f64().unwrap()), "{runs}: {steal:?}");
        }
    }
    for plan in ["conv_algos_training", "conv_algos_inference"] {
        let names: Vec<&String> = r[plan].as_object().unwrap().keys().collect();
        assert_eq!(names, ["conv1", "conv2", "conv3"], "{plan}");
    }
    assert!(r["conv_algo_source"].as_str().unwrap().starts_with("measured"), "{}", r["conv_algo_source"]);
    assert_eq!(r["conv_algo_times"].as_array().unwrap().len(), 6, "three layers, training and inference");
    // ...and the second run reads the choice from the cache instead of timing again.
    let again: serde_json::Value = serde_json::from_slice(&alexnet(&args).stdout).unwrap();
    assert!(again["conv_algo_source"].as_str().unwrap().starts_with("cached in"), "{}", again["conv_algo_source"]);
    assert_eq!(again["conv_algos_training"], r["conv_algos_training"]);
    // A forced algorithm applies wherever it can (Winograd is not for conv1's single channel).
    let forced: serde_json::Value = serde_json::from_slice(&alexnet(&[&args[..], &["--conv-algo", "im2col"]].concat()).stdout).unwrap();
    for layer in ["conv1", "conv2", "conv3"] {
        assert_eq!(forced["conv_algos_training"][layer]["forward"], "im2col");
        assert_eq!(forced["conv_algos_inference"][layer]["weight_grad"], "im2col");
    }
}

/// `features`: a layer's activations for a dataset's test images or for image files, the same
/// bytes every time, as safetensors (with labels and names) or .npy; `plot --filters` and
/// `--activations`; `neighbours`.
#[test]
fn features_are_deterministic_and_shaped_in_both_formats() {
    let s = support::setup(64, 40);
    let mut model = alexnet::model::Model::new(&alexnet::architectures::alexnet_mnist()).unwrap();
    model.init(3, 0.0);
    let file = s.root.join("model.safetensors");
    alexnet::checkpoint::save(&model, &file, &[]).unwrap();
    let f = file.to_str().unwrap();
    let data = s.data.to_str().unwrap();
    let run = |out: &Path, extra: &[&str]| {
        let args =
            [&["features", "--checkpoint", f, "--layer", "fc2", "--batch-size", "16", "--out", out.to_str().unwrap()][..], extra].concat();
        let done = alexnet(&args);
        assert!(done.status.success(), "{}", String::from_utf8_lossy(&done.stderr));
        std::fs::read(out).unwrap()
    };
    let (a, b) = (s.root.join("a.safetensors"), s.root.join("b.safetensors"));
    let bytes = run(&a, &["--data", data]);
    assert!(bytes == run(&b, &["--data", data]), "the same features, byte for byte");
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    assert_eq!(st.tensor("features").unwrap().shape(), [40, 1024]);
    let labels: Vec<i64> = st.tensor("labels").unwrap().data().chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().unwrap())).collect();
    let want = alexnet::data::mnist::load(&s.data, alexnet::data::mnist::Split::Test, false).unwrap().labels;
    assert_eq!(labels, want.iter().map(|&l| l as i64).collect::<Vec<_>>());
    // .npy beside its labels and names; image files get label -1.
    let digit = s.root.join("digit.png");
    image::GrayImage::from_fn(28, 28, |x, y| image::Luma([if (10..18).contains(&x) && (4..24).contains(&y) { 255 } else { 0 }]))
        .save(&digit)
        .unwrap();
    let npy = run(&s.root.join("c.npy"), &[digit.to_str().unwrap(), digit.to_str().unwrap()]);
    assert!(npy.starts_with(b"\x93NUMPY\x01\x00") && String::from_utf8_lossy(&npy[..128]).contains("'shape': (2, 1024)"));
    let labels = std::fs::read(s.root.join("c.labels.npy")).unwrap();
    assert!(labels.len() % 64 == 16 && labels.ends_with(&[0xff; 16]), "two labels of -1 after a 64-byte-aligned header");
    assert_eq!(std::fs::read_to_string(s.root.join("c.names.txt")).unwrap().lines().count(), 2);
    fails_with(&["features", "--checkpoint", f, "--layer", "fc9", "--out", "x.npy"], &["no layer 'fc9'", "fc2"]);
    // The first layer's 64 kernels as a picture (the paper's figure 3).
    let png = s.root.join("filters.png");
    assert!(alexnet(&["plot", "--filters", "--checkpoint", f, "--out", png.to_str().unwrap()]).status.success());
    assert_eq!(image::open(&png).unwrap().to_rgb8().dimensions(), (420, 420));
    fails_with(&["plot", "--filters", "--out", png.to_str().unwrap()], &["--checkpoint"]);
    // conv2's 128 feature maps (14x14, at 3x) of one digit, in a 12 x 11 grid.
    let maps = s.root.join("maps.png");
    let args = ["plot", "--activations", digit.to_str().unwrap(), "--checkpoint", f, "--layer", "conv2", "--out", maps.to_str().unwrap()];
    assert!(alexnet(&args).status.success());
    assert_eq!(image::open(&maps).unwrap().to_rgb8().dimensions(), (12 * 46 + 4, 11 * 46 + 4));
    fails_with(&["plot", "--activations", "x.png", "--checkpoint", f, "--out", "y.png"], &["--layer"]);
    // The paper's figure 4: 3 queries (one file, two test digits), each beside its 2 nearest
    // training digits.
    let grid = s.root.join("grid.png");
    let args = ["neighbours", "--checkpoint", f, "--data", data, "--k", "2", "--test-queries", "2", "--out", grid.to_str().unwrap()];
    let done = alexnet(&[&args[..], &["--query", digit.to_str().unwrap()]].concat());
    assert!(done.status.success(), "{}", String::from_utf8_lossy(&done.stderr));
    assert_eq!(image::open(&grid).unwrap().to_rgb8().dimensions(), (3 * 104 + 24, 3 * 126 + 8));
}
