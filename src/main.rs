use alexnet::architectures::{MODEL_NAMES, architecture, with_input_size};
use alexnet::bench::{self, BenchPlan};
use alexnet::cluster::{self, Cluster};
use alexnet::config::{ConvFlags, ModelDefaults, TrainConfig};
use alexnet::data::mnist::{self, Split};
use alexnet::data::source::{OpenOptions, Source};
use alexnet::denormals::{self, start_thread_pool};
use alexnet::layers::softmax::softmax;
use alexnet::model::{Mode, Model, Workspace, forward};
use alexnet::{checkpoint, predict, summary, train};
use anyhow::{Context, Result, bail};
use clap::parser::ValueSource;
use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};
use sha2::{Digest, Sha256};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize};
use std::time::Duration;

/// AlexNet (Krizhevsky, Sutskever & Hinton, 2012) and its MNIST adaptation, trained on the CPU.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    /// Worker threads (default: all cores).
    #[arg(long, global = true)]
    threads: Option<usize>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Train a model (defaults: the notebook's AlexNet-for-MNIST run).
    Train(Box<TrainArgs>),
    /// Test-set accuracy and loss of a model file.
    Eval(EvalArgs),
    /// Classify digit images (PNG or JPEG, any size).
    Predict(PredictArgs),
    /// Write a layer's activations (embeddings) for a dataset's evaluation images or for image
    /// files, with labels and names, as .safetensors or .npy.
    Features(FeaturesArgs),
    /// The paper's figure 4: query images beside the training images whose features are
    /// nearest, with the queries' predicted top-5 classes, as one PNG.
    Neighbours(NeighboursArgs),
    /// Write a model file as ONNX (inputs NCHW in [0, 1]; outputs logits and probabilities).
    Export(ExportArgs),
    /// Draw a run's loss and accuracy curves and its test confusion matrix as PNGs.
    Plot(PlotArgs),
    /// Print a model's layer table.
    Summary(SummaryArgs),
    /// Measure training and inference throughput: real MNIST batches for the seed model,
    /// random images (--dummy) for the ImageNet models.
    Bench(BenchArgs),
}

#[derive(clap::Args)]
struct TrainArgs {
    /// Continue the run in this directory from its last checkpoint, with its saved config
    /// (and its thread count, unless --threads says otherwise); no training flag goes with it.
    #[arg(long, value_name = "RUN_DIR")]
    resume: Option<PathBuf>,
    #[command(flatten)]
    config: TrainConfig,
    #[command(flatten)]
    defaults: ModelDefaults,
    /// Under `mpirun` (built with `--features mpi`): end the job if another rank does not
    /// answer within this many seconds (a dead or hung rank). It must exceed rank 0's longest
    /// solo phase: evaluation plus writing a checkpoint.
    #[arg(long, default_value_t = 600.0, value_name = "SECS")]
    mpi_timeout: f64,
}

#[derive(clap::Args)]
struct EvalArgs {
    #[arg(long)]
    checkpoint: PathBuf,
    /// Architecture, for model files without alexnet's metadata (e.g. saved from PyTorch).
    #[arg(long)]
    model: Option<String>,
    /// MNIST IDX files (default: $ALEXNET_DATA or the vendored copy), or an ImageFolder
    /// dataset, evaluated on its val/ images.
    #[arg(long)]
    data: Option<PathBuf>,
    /// Default: the model's evaluation batch (1000 for alexnet-mnist, 128 for the others).
    #[arg(long)]
    batch_size: Option<usize>,
    /// ImageFolder data: average the softmax over ten crops.
    #[arg(long)]
    ten_crop: bool,
    /// Also print the confusion matrix and per-class accuracy.
    #[arg(long)]
    confusion: bool,
}

#[derive(clap::Args)]
struct PredictArgs {
    #[arg(long)]
    checkpoint: PathBuf,
    /// Architecture, for model files without alexnet's metadata (e.g. saved from PyTorch).
    #[arg(long)]
    model: Option<String>,
    /// Print all class probabilities per image as JSON lines.
    #[arg(long)]
    json: bool,
    /// How many of the most likely classes to print.
    #[arg(long, default_value_t = 3)]
    top: usize,
    #[arg(required = true)]
    images: Vec<PathBuf>,
}

#[derive(clap::Args)]
struct FeaturesArgs {
    #[arg(long)]
    checkpoint: PathBuf,
    /// Architecture, for model files without alexnet's metadata (e.g. saved from PyTorch).
    #[arg(long)]
    model: Option<String>,
    /// The layer, as `summary` names it (e.g. fc7 for the paper's models, fc2 for alexnet-mnist).
    #[arg(long)]
    layer: String,
    /// A dataset: MNIST IDX files (its test images; default: the vendored MNIST) or an
    /// ImageFolder dataset (its val/ images; with IMAGES, the mean image that prepares them).
    #[arg(long)]
    data: Option<PathBuf>,
    /// Default: the model's evaluation batch.
    #[arg(long)]
    batch_size: Option<usize>,
    /// FILE.safetensors (features [N, D], labels [N], names in the metadata), or FILE.npy
    /// (with FILE.labels.npy and FILE.names.txt beside it).
    #[arg(long, value_name = "FILE")]
    out: PathBuf,
    /// Image files instead (PNG or JPEG): digits for alexnet-mnist, prepared as `predict`
    /// does; for the ImageNet models centre-cropped, less --data's mean image.
    images: Vec<PathBuf>,
}

#[derive(clap::Args)]
struct NeighboursArgs {
    #[arg(long)]
    checkpoint: PathBuf,
    /// The training images to search: MNIST IDX files (default: the vendored MNIST) or an
    /// ImageFolder dataset (its train/ images, centre-cropped).
    #[arg(long)]
    data: Option<PathBuf>,
    /// Default: the last hidden layer (fc7 for the paper's models, fc2 for alexnet-mnist).
    #[arg(long)]
    layer: Option<String>,
    /// Neighbours per query.
    #[arg(long, default_value_t = 6)]
    k: usize,
    /// Also the first N evaluation images (MNIST's test digits, an ImageFolder's val/) as queries.
    #[arg(long, value_name = "N", default_value_t = 0)]
    test_queries: usize,
    /// Default: the model's evaluation batch.
    #[arg(long)]
    batch_size: Option<usize>,
    #[arg(long, value_name = "FILE.png")]
    out: PathBuf,
    /// Query images (PNG or JPEG).
    #[arg(long = "query", value_name = "IMAGE", num_args = 1..)]
    query: Vec<PathBuf>,
}

#[derive(clap::Args)]
struct ExportArgs {
    #[arg(long)]
    checkpoint: PathBuf,
    /// Architecture, for model files without alexnet's metadata (e.g. saved from PyTorch).
    #[arg(long)]
    model: Option<String>,
    #[arg(long, value_name = "OUT.onnx")]
    onnx: PathBuf,
    /// Replace OUT.onnx if it exists.
    #[arg(long)]
    force: bool,
}

#[derive(clap::Args)]
struct PlotArgs {
    #[arg(value_name = "RUN_DIR", required_unless_present_any = ["filters", "activations"])]
    run: Option<PathBuf>,
    /// Instead: the first layer's kernels of --checkpoint as an image grid (the paper's
    /// figure 3), each kernel scaled to its own range, written to --out.
    #[arg(long, requires_all = ["checkpoint", "out"], conflicts_with_all = ["run", "activations"])]
    filters: bool,
    /// Instead: --layer's feature maps for this image (a digit for alexnet-mnist; for the
    /// ImageNet models, prepared with --data's mean image), one tile per channel.
    #[arg(long, value_name = "IMAGE", requires_all = ["checkpoint", "out", "layer"], conflicts_with = "run")]
    activations: Option<PathBuf>,
    #[arg(long)]
    layer: Option<String>,
    /// The ImageFolder dataset whose mean image prepares the --activations image.
    #[arg(long)]
    data: Option<PathBuf>,
    #[arg(long)]
    checkpoint: Option<PathBuf>,
    #[arg(long, value_name = "FILE.png")]
    out: Option<PathBuf>,
}

#[derive(clap::Args)]
struct SummaryArgs {
    #[arg(long, default_value = "alexnet-mnist", conflicts_with = "checkpoint")]
    model: String,
    /// Output classes (default: the model's own, 10 for MNIST, 1000 for ImageNet).
    #[arg(long, conflicts_with = "checkpoint")]
    classes: Option<usize>,
    /// Square input size (default: the model's own; alexnet-owt takes 63 and up).
    #[arg(long, value_name = "PIXELS", conflicts_with = "checkpoint")]
    input_size: Option<usize>,
    /// The model in this file (its architecture from the file), with the file's SHA-256:
    /// model files are byte-reproducible, so equal checksums mean equal models.
    #[arg(long, value_name = "FILE")]
    checkpoint: Option<PathBuf>,
}

#[derive(clap::Args)]
struct BenchArgs {
    #[arg(long, default_value = "alexnet-mnist")]
    model: String,
    /// Square input size (default: the model's own).
    #[arg(long, value_name = "PIXELS")]
    input_size: Option<usize>,
    #[arg(long, visible_alias = "batch", default_value_t = 64)]
    batch_size: usize,
    /// Inference batch (default: 1000 for the seed model, else the training batch).
    #[arg(long)]
    infer_batch: Option<usize>,
    /// Random images with fixed labels instead of MNIST (implied for models that do not
    /// take 28x28 grayscale).
    #[arg(long)]
    dummy: bool,
    /// Timed runs (the median is reported).
    #[arg(long, default_value_t = 7)]
    runs: usize,
    /// Training steps per timed run.
    #[arg(long, default_value_t = 20)]
    steps: usize,
    #[arg(long)]
    data: Option<PathBuf>,
    #[arg(long)]
    json: bool,
    /// Also print the time of each layer's forward and backward pass.
    #[arg(long)]
    layers: bool,
    /// Also measure the GEMM ceiling: the step's GEMMs as plain im2col, timed on one core.
    #[arg(long)]
    roofline: bool,
    /// Time with these weights (a model or checkpoint file) instead of fresh ones: trained
    /// weights are where denormal floats appear.
    #[arg(long, value_name = "FILE")]
    checkpoint: Option<PathBuf>,
    #[command(flatten)]
    conv: ConvFlags,
}

/// The flags `train --resume` takes besides the run directory: how to run, not what to train.
const RESUME_FLAGS: &[&str] = &["resume", "threads", "mpi_timeout"];

fn main() -> ExitCode {
    // Before any thread starts: threads spawned from here on inherit it (and set it again).
    denormals::flush_denormals_on_this_thread();
    let matches = Cli::command().get_matches();
    let cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    // The flags given on the command line: `train --resume` refuses every training flag.
    let given: Vec<String> = match matches.subcommand() {
        Some(("train", sub)) => {
            sub.ids().filter(|id| sub.value_source(id.as_str()) == Some(ValueSource::CommandLine)).map(|id| id.to_string()).collect()
        }
        _ => Vec::new(),
    };
    match run(cli, &given) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// `path` made absolute (not resolving links), so a run's config.json names the same files from
/// any working directory (`--resume` from elsewhere).
fn absolute(path: PathBuf) -> Result<PathBuf> {
    std::path::absolute(&path).with_context(|| format!("cannot make {} an absolute path", path.display()))
}

/// The most `--threads` per core this machine has.
const MAX_THREADS_PER_CORE: usize = 8;

/// SIGINT and SIGTERM set `stop` to the signal's number, which the training loop polls after
/// each step; a second one exits at once (with the conventional 128 + signal status).
fn stop_on_signals() -> Result<Arc<AtomicUsize>> {
    use signal_hook::consts::{SIGINT, SIGTERM};
    let stop = Arc::new(AtomicUsize::new(0));
    let seen = Arc::new(AtomicBool::new(false));
    for signal in [SIGINT, SIGTERM] {
        // Registration order matters: the exit check must run before `seen` is set.
        signal_hook::flag::register_conditional_shutdown(signal, 128 + signal, seen.clone())?;
        signal_hook::flag::register(signal, seen.clone())?;
        signal_hook::flag::register_usize(signal, stop.clone(), signal as usize)?;
    }
    Ok(stop)
}

fn run(cli: Cli, given: &[String]) -> Result<ExitCode> {
    let threads = cli.threads;
    if threads == Some(0) {
        bail!("--threads must be at least 1");
    }
    // Far more threads than cores only costs memory and switching, and absurd counts fail
    // deep inside the thread library: refuse them here, by name.
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    if let Some(t) = threads.filter(|&t| t > MAX_THREADS_PER_CORE * cores) {
        bail!(
            "--threads {t} is more than {MAX_THREADS_PER_CORE} per core on this machine's {cores} cores: use at most {}",
            MAX_THREADS_PER_CORE * cores
        );
    }
    let command = match cli.command {
        Command::Train(a) => return train_command(a, threads, given),
        command => command,
    };
    let threads = threads.unwrap_or_else(default_threads);
    start_thread_pool(threads)?;
    match command {
        Command::Train(_) => unreachable!("handled above"),
        Command::Eval(args) => eval_command(args)?,
        Command::Predict(args) => predict_command(args)?,
        Command::Features(args) => features_command(args)?,
        Command::Neighbours(args) => neighbours_command(args)?,
        Command::Export(args) => export_command(args)?,
        Command::Plot(args) => plot_command(args)?,
        Command::Summary(args) => summary_command(args)?,
        Command::Bench(args) => bench_command(args)?,
    }
    Ok(ExitCode::SUCCESS)
}

fn eval_command(EvalArgs { checkpoint: path, model, data, batch_size, ten_crop, confusion }: EvalArgs) -> Result<()> {
    if batch_size == Some(0) {
        bail!("--batch-size must be at least 1");
    }
    let model = checkpoint::load(&path, model.map(|m| architecture(&m, None)).transpose()?)?;
    let recipe = alexnet::architectures::recipe(&model.arch.name);
    let batch_size = batch_size.or(recipe.eval_batch).unwrap_or(recipe.batch_size);
    let cache = alexnet::cache_dir::default_cache_dir();
    let options = OpenOptions { ten_crop, cache_dir: cache.as_deref(), ..Default::default() };
    let source = Source::open(data.as_deref(), model.arch.input, model.arch.input_scale, &options)?;
    if source.classes() != model.classes() {
        bail!("{} has {} classes, the model {}", data.unwrap_or_default().display(), source.classes(), model.classes());
    }
    let mut ws = Workspace::new(&model, batch_size, false);
    let r = alexnet::eval::evaluate_source(&model, &mut ws, &source)?;
    println!(
        "{}: {} {} images, loss {:.4}, accuracy {:.2}% (top-5 {:.2}%)",
        path.display(),
        r.samples,
        source.eval_split(),
        r.loss,
        100.0 * r.accuracy,
        100.0 * r.top5_accuracy
    );
    if confusion {
        print!("true\\pred");
        (0..r.confusion.len()).for_each(|j| print!("{j:>6}"));
        println!("  accuracy");
        for (i, row) in r.confusion.iter().enumerate() {
            print!("{i:>9}");
            row.iter().for_each(|c| print!("{c:>6}"));
            println!("  {:.2}%", 100.0 * row[i] as f32 / row.iter().sum::<usize>().max(1) as f32);
        }
    }
    Ok(())
}

fn predict_command(PredictArgs { checkpoint: path, model, json, top, images }: PredictArgs) -> Result<()> {
    if top == 0 {
        bail!("--top must be at least 1");
    }
    let model = checkpoint::load(&path, model.map(|m| architecture(&m, None)).transpose()?)?;
    check_input(&model, 28, 28)?;
    let classes = model.classes();
    let mut ws = Workspace::new(&model, 1, false);
    let mut failed = 0;
    for img in &images {
        let pixels = match predict::load_digit(img) {
            Ok(p) => p,
            Err(e) => {
                eprintln!("error: {e:#}");
                failed += 1;
                continue;
            }
        };
        ws.input_mut().copy_from_slice(&pixels);
        forward(&model, &mut ws, 1, Mode::Eval);
        let mut probs = vec![0.0; classes];
        softmax(ws.logits(1, classes), classes, &mut probs);
        let mut ranked: Vec<usize> = (0..classes).collect();
        ranked.sort_by(|&a, &b| probs[b].total_cmp(&probs[a]));
        if json {
            println!("{}", serde_json::json!({"image": img.display().to_string(), "prediction": ranked[0], "probabilities": probs}));
        } else {
            let best: Vec<String> = ranked.iter().take(top).map(|&c| format!("{c} ({:.2}%)", 100.0 * probs[c])).collect();
            println!("{}: {}", img.display(), best.join(", "));
        }
    }
    if failed > 0 {
        bail!("{failed} of {} images could not be read", images.len());
    }
    Ok(())
}

fn features_command(FeaturesArgs { checkpoint: path, model, layer, data, batch_size, out, images }: FeaturesArgs) -> Result<()> {
    let model = checkpoint::load(&path, model.map(|m| architecture(&m, None)).transpose()?)?;
    let layer_at = model.layer_index(&layer)?;
    let recipe = alexnet::architectures::recipe(&model.arch.name);
    let batch = batch_size.or(recipe.eval_batch).unwrap_or(recipe.batch_size);
    if batch == 0 {
        bail!("--batch-size must be at least 1");
    }
    let (names, labels, (dim, values)) = if images.is_empty() {
        let cache = alexnet::cache_dir::default_cache_dir();
        let options = OpenOptions { cache_dir: cache.as_deref(), ..Default::default() };
        let source = Source::open(data.as_deref(), model.arch.input, model.arch.input_scale, &options)?;
        let labels: Vec<i64> = source.eval_labels().iter().map(|&l| l as i64).collect();
        let extracted = alexnet::features::extract(&model, layer_at, labels.len(), batch, |r, input| source.fill_eval(r, 0, input))?;
        (source.eval_names(), labels, extracted)
    } else {
        let inputs = prepare_images(&model, &images, data.as_deref())?;
        let il = model.input_len();
        let extracted = alexnet::features::extract(&model, layer_at, images.len(), batch, |r, input| {
            input[..r.len() * il].copy_from_slice(&inputs[r.start * il..r.end * il]);
            Ok(())
        })?;
        (images.iter().map(|p| p.display().to_string()).collect(), vec![-1; images.len()], extracted)
    };
    let f = alexnet::features::Features { layer, dim, values, labels, names };
    let written = alexnet::features::write(&f, &out)?;
    let paths: Vec<String> = written.iter().map(|p| p.display().to_string()).collect();
    println!("{} x {} features of {} written to {}", f.labels.len(), f.dim, f.layer, paths.join(", "));
    Ok(())
}

fn neighbours_command(
    NeighboursArgs { checkpoint: path, data, layer, k, test_queries, batch_size, out, query }: NeighboursArgs,
) -> Result<()> {
    let model = checkpoint::load(&path, None)?;
    let recipe = alexnet::architectures::recipe(&model.arch.name);
    let batch = batch_size.or(recipe.eval_batch).unwrap_or(recipe.batch_size);
    if batch == 0 || k == 0 {
        bail!("--batch-size and --k must be at least 1");
    }
    let cache = alexnet::cache_dir::default_cache_dir();
    let options = OpenOptions { for_training: true, cache_dir: cache.as_deref(), ..Default::default() };
    let source = Source::open(data.as_deref(), model.arch.input, model.arch.input_scale, &options)?;
    let request = alexnet::neighbours::Request { source: &source, layer: layer.as_deref(), k, files: &query, test_queries, batch };
    let (png, (w, h)) = alexnet::neighbours::figure(&model, &request)?;
    alexnet::files::write_atomic(&out, &png)?;
    println!("{} ({w}x{h})", out.display());
    Ok(())
}

fn export_command(ExportArgs { checkpoint: path, model, onnx, force }: ExportArgs) -> Result<()> {
    if onnx.exists() {
        if std::fs::canonicalize(&onnx).ok() == std::fs::canonicalize(&path).ok() {
            bail!("{} is the model being exported: writing the ONNX file there would destroy it", onnx.display());
        }
        if !force {
            bail!("{} already exists: pass --force to replace it", onnx.display());
        }
    }
    let model = checkpoint::load(&path, model.map(|m| architecture(&m, None)).transpose()?)?;
    alexnet::onnx::export(&model, &onnx)?;
    println!("{} -> {} (ONNX opset {})", path.display(), onnx.display(), alexnet::onnx::OPSET);
    Ok(())
}

fn plot_command(PlotArgs { run, filters: _, activations, layer, data, checkpoint: file, out }: PlotArgs) -> Result<()> {
    match (run, file, out) {
        (Some(run), _, _) => {
            for path in alexnet::plot::write_run_plots(&run)? {
                println!("{}", path.display());
            }
        }
        (None, Some(file), Some(out)) => {
            let model = checkpoint::load(&file, None)?;
            let (png, (w, h)) = match (activations, layer) {
                (Some(image), Some(layer)) => {
                    let at = model.layer_index(&layer)?;
                    let input = prepare_images(&model, &[image], data.as_deref())?;
                    let (_, output) = alexnet::features::extract(&model, at, 1, 1, |_, dst| {
                        dst[..input.len()].copy_from_slice(&input);
                        Ok(())
                    })?;
                    alexnet::plot::activations_png(&model, at, &output)?
                }
                _ => alexnet::plot::filters_png(&model)?,
            };
            alexnet::files::write_atomic(&out, &png)?;
            println!("{} ({w}x{h})", out.display());
        }
        _ => unreachable!("clap requires RUN_DIR, or --filters or --activations with --checkpoint and --out"),
    }
    Ok(())
}

fn summary_command(SummaryArgs { model, classes, input_size, checkpoint: file }: SummaryArgs) -> Result<()> {
    let m = match &file {
        Some(path) => {
            let m = checkpoint::load(path, None)?;
            let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
            let sha: String = Sha256::digest(&bytes).iter().map(|b| format!("{b:02x}")).collect();
            println!("{}: {} bytes, SHA-256 {sha}", path.display(), bytes.len());
            m
        }
        None => Model::new(&with_input_size(architecture(&model, classes)?, input_size)?)?,
    };
    print!("{}", summary::table(&m));
    Ok(())
}

fn bench_command(
    BenchArgs { model, input_size, batch_size, infer_batch, dummy, runs, steps, data, json, layers, roofline, checkpoint: weights, conv }: BenchArgs,
) -> Result<()> {
    // The model trains as `alexnet train` would: its recipe's optimiser and dropout.
    let defaults = TrainConfig::defaults(&model);
    let arch = with_input_size(architecture(&model, None)?, input_size)?;
    let mut m = match &weights {
        Some(path) => checkpoint::load(path, Some(arch.clone()))?,
        None => {
            let mut m = Model::new(&arch)?;
            m.init(1, 0.0);
            m
        }
    };
    // The recipe's evaluation batch (the seed model's 1000), else the training batch.
    let infer_batch = infer_batch.or(alexnet::architectures::recipe(&model).eval_batch).unwrap_or(batch_size);
    if batch_size == 0 || infer_batch == 0 || runs == 0 || steps == 0 {
        bail!("--batch-size, --infer-batch, --runs and --steps must be at least 1");
    }
    // MNIST batches where the model takes digits; random images of its input shape otherwise.
    let train_set = if dummy || m.arch.input != [28, 28, 1] {
        mnist::Dataset::dummy(2 * batch_size.max(infer_batch), m.arch.input, m.classes())
    } else {
        let (dir, strict) = mnist::resolve_dir(data.as_deref());
        mnist::load(&dir, Split::Train, strict)?
    };
    let r = bench::run(
        &mut m,
        defaults.optimizer_config(),
        &train_set,
        &BenchPlan {
            train_batch: batch_size,
            keep_prob: defaults.keep_prob,
            infer_batch,
            runs,
            steps_per_run: steps,
            layers,
            roofline,
            conv_algo: conv.conv_algo,
            cache_dir: conv.cache_dir.or_else(alexnet::cache_dir::default_cache_dir),
        },
    )?;
    if json {
        println!("{}", serde_json::to_string(&r)?);
    } else {
        let source = if train_set.channels == 1 && !dummy { "MNIST" } else { "random images" };
        let weights = weights.map_or("fresh weights".to_string(), |p| format!("weights of {}", p.display()));
        print!("{}", bench::report(&r, &m, &format!("{source}, {weights}"), runs, steps, layers));
    }
    Ok(())
}

/// All cores, shared out among the ranks `mpirun` put on this machine (one without it).
fn default_threads() -> usize {
    (std::thread::available_parallelism().map_or(1, |n| n.get()) / cluster::ranks_on_this_machine()).max(1)
}

/// `alexnet train`, as one process or as one rank of an `mpirun` job. A rank that fails ends the
/// whole job, so no other rank waits for it.
fn train_command(a: Box<TrainArgs>, threads: Option<usize>, given: &[String]) -> Result<ExitCode> {
    if a.resume.is_some()
        && let Some(flag) = given.iter().find(|id| !RESUME_FLAGS.contains(&id.as_str()))
    {
        bail!("--resume continues a run with its saved config: --{} cannot be given with it", flag.replace('_', "-"));
    }
    if !(a.mpi_timeout > 0.0 && a.mpi_timeout.is_finite()) {
        bail!("--mpi-timeout must be a positive number of seconds, got {}", a.mpi_timeout);
    }
    let mut cluster = cluster::connect(Duration::from_secs_f64(a.mpi_timeout))?;
    let result = train_as_rank(*a, threads, &mut *cluster);
    match result {
        Err(e) if cluster.ranks() > 1 => {
            eprintln!("error: rank {} of {}: {e:#}", cluster.rank(), cluster.ranks());
            cluster.abort_all();
            Ok(ExitCode::FAILURE)
        }
        other => other,
    }
}

fn train_as_rank(a: TrainArgs, threads: Option<usize>, cluster: &mut dyn Cluster) -> Result<ExitCode> {
    if let Some(dir) = &a.resume {
        // The saved config is on rank 0's machine; the other ranks get it from rank 0.
        let mut text = Vec::new();
        if cluster.rank() == 0 {
            text = serde_json::to_vec(&alexnet::run_dir::read_config(dir)?)?;
        }
        cluster.broadcast_bytes(&mut text, "rank 0's saved config")?;
        let mut cfg: TrainConfig = serde_json::from_slice(&text).context("the saved config from rank 0")?;
        cfg.out = dir.clone();
        if cluster.rank() == 0 && threads.is_some_and(|t| t != cfg.threads) {
            eprintln!(
                "warning: the run used {} threads; with {} the result will not be bit-identical to an uninterrupted run",
                cfg.threads,
                threads.unwrap_or_default()
            );
        }
        if cluster.rank() == 0 && cluster.ranks() != cfg.ranks {
            eprintln!(
                "warning: the run used {} ranks, this job has {}: it goes on with the same global batch, but not bit-identically",
                cfg.ranks,
                cluster.ranks()
            );
        }
        cfg.threads = threads.unwrap_or(cfg.threads);
        cfg.ranks = cluster.ranks();
        start_thread_pool(cfg.threads)?;
        return finish_training(train::train(&cfg, true, &*stop_on_signals()?, cluster)?);
    }
    let threads = threads.unwrap_or_else(default_threads);
    start_thread_pool(threads)?;
    let model = a.config.model.clone();
    let mut cfg = a.defaults.into_config(a.config, || {
        let secs = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
        PathBuf::from(format!("runs/{model}-{secs}"))
    });
    (cfg.threads, cfg.ranks) = (threads, cluster.ranks());
    cfg.out = absolute(cfg.out)?;
    cfg.data = cfg.data.map(absolute).transpose()?;
    cfg.init_from = cfg.init_from.map(absolute).transpose()?;
    cfg.conv.cache_dir = cfg.conv.cache_dir.map(absolute).transpose()?;
    finish_training(train::train(&cfg, false, &*stop_on_signals()?, cluster)?)
}

/// A run stopped by a signal exits with the shell's convention for that signal (128 + number).
fn finish_training(outcome: train::TrainOutcome) -> Result<ExitCode> {
    Ok(match outcome {
        train::TrainOutcome::Finished { .. } | train::TrainOutcome::FinishedWorker => ExitCode::SUCCESS,
        train::TrainOutcome::Interrupted { signal, .. } => ExitCode::from(128 + signal as u8),
    })
}

/// Image files as `model` takes them (`predict::prepare_images`), the ImageNet models' with the
/// mean image of the ImageFolder dataset `data`.
fn prepare_images(model: &Model, images: &[PathBuf], data: Option<&std::path::Path>) -> Result<Vec<f32>> {
    let cache = alexnet::cache_dir::default_cache_dir();
    let options = OpenOptions { cache_dir: cache.as_deref(), ..Default::default() };
    let folder = match data {
        Some(dir) if model.arch.input != [28, 28, 1] => {
            match Source::open(Some(dir), model.arch.input, model.arch.input_scale, &options)? {
                Source::Folder { data, .. } => Some(data),
                _ => bail!("{} is not an ImageFolder dataset (train/ and val/)", dir.display()),
            }
        }
        _ => None,
    };
    predict::prepare_images(model, images, folder.as_ref())
}

/// The data or image size must be the model's input size.
fn check_input(model: &Model, rows: usize, cols: usize) -> Result<()> {
    if model.arch.input != [rows, cols, 1] {
        bail!(
            "model {} takes {:?} inputs, not {rows}x{cols} grayscale (known models: {})",
            model.arch.name,
            model.arch.input,
            MODEL_NAMES.join(", ")
        );
    }
    Ok(())
}
