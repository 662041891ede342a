//! Model files: safetensors with PyTorch's names and layouts, so a PyTorch module of the same
//! architecture loads them with `load_state_dict`. Conv weights are OIHW (ours are HWIO) and
//! the first FC layer's input is flattened C,H,W (ours H,W,C); both are converted here. The
//! architecture travels in the file's metadata, so `eval` and `predict` need only the file.

use crate::files::{f32_bytes, f32s_from_bytes, metadata, safetensors_bytes, write_atomic};
use crate::layers::layer::ParamLayout;
use crate::model::{Architecture, Model, Param};
use crate::optim::Optimizer;
use anyhow::{Context, Result, bail};
use safetensors::SafeTensors;
use safetensors::tensor::{Dtype, TensorView};
use std::collections::HashMap;
use std::path::Path;

const ARCH_KEY: &str = "alexnet.architecture";

/// Index in our layout of each PyTorch-layout element: `ours[map[i]] = torch[i]`.
fn torch_to_ours(layout: &ParamLayout, len: usize) -> Option<Vec<usize>> {
    match *layout {
        ParamLayout::Same => None,
        ParamLayout::Hwio { k, cin_g, out } => Some(
            (0..len)
                .map(|i| {
                    let (o, rest) = (i / (cin_g * k * k), i % (cin_g * k * k));
                    let (ci, ky, kx) = (rest / (k * k), (rest / k) % k, rest % k);
                    ((ky * k + kx) * cin_g + ci) * out + o
                })
                .collect(),
        ),
        ParamLayout::FlattenHwc { out, h, w, c } => {
            let inn = h * w * c;
            debug_assert_eq!(len, out * inn);
            Some(
                (0..len)
                    .map(|i| {
                        let (o, j) = (i / inn, i % inn);
                        let (ch, y, x) = (j / (h * w), (j / w) % h, j % w);
                        o * inn + (y * w + x) * c + ch
                    })
                    .collect(),
            )
        }
    }
}

/// Tensors shaped like the model's parameters (the parameters themselves, or an optimiser
/// slot, which frozen parameters leave empty and which are left out), converted to PyTorch
/// layout and named `prefix` + the parameter's name.
fn to_torch(model: &Model, prefix: &str, values: &[Vec<f32>]) -> Vec<(String, Vec<usize>, Vec<f32>)> {
    model
        .params
        .iter()
        .zip(values)
        .filter(|(p, v)| !v.is_empty() || p.value.is_empty())
        .map(|(p, v)| {
            let data = match torch_to_ours(&p.layout, v.len()) {
                None => v.clone(),
                Some(map) => map.iter().map(|&j| v[j]).collect(),
            };
            (format!("{prefix}{}", p.name), p.torch_shape.clone(), data)
        })
        .collect()
}

/// The model's parameters in PyTorch layout, by name.
pub fn torch_tensors(model: &Model) -> Vec<(String, Vec<usize>, Vec<f32>)> {
    let values: Vec<Vec<f32>> = model.params.iter().map(|p| p.value.clone()).collect();
    to_torch(model, "", &values)
}

/// Training checkpoints add the optimiser's slots as `optimizer.slot1.<param>` (Adam's first
/// moment or SGD's velocity) and `optimizer.slot2.<param>` (Adam's second moment), in the same
/// layout as the parameter, and its step count in the metadata.
const OPTIMIZER_PREFIX: &str = "optimizer.";
const OPTIMIZER_STEP_KEY: &str = "optimizer.step";
const OPTIMIZER_KIND_KEY: &str = "optimizer.kind";

fn slot_prefix(slot: usize) -> String {
    format!("{OPTIMIZER_PREFIX}slot{slot}.")
}

/// Serialise to safetensors bytes, with the architecture and `extra` in the metadata, and the
/// optimiser's state when given (a training checkpoint).
pub fn to_bytes(model: &Model, extra: &[(&str, String)], optimizer: Option<&Optimizer>) -> Result<Vec<u8>> {
    let mut tensors = torch_tensors(model);
    let mut meta: HashMap<String, String> = extra.iter().map(|(k, v)| (k.to_string(), v.clone())).collect();
    if let Some(opt) = optimizer {
        for (slot, values) in [(1, &opt.slot1), (2, &opt.slot2)] {
            if !values.is_empty() {
                tensors.extend(to_torch(model, &slot_prefix(slot), values));
            }
        }
        meta.insert(OPTIMIZER_STEP_KEY.into(), opt.step.to_string());
        meta.insert(OPTIMIZER_KIND_KEY.into(), serde_json::to_string(&opt.config.kind)?);
    }
    let bytes: Vec<Vec<u8>> = tensors.iter().map(|(_, _, d)| f32_bytes(d)).collect();
    let views = tensors
        .iter()
        .zip(&bytes)
        .map(|((name, shape, _), b)| Ok((name.clone(), TensorView::new(Dtype::F32, shape.clone(), b)?)))
        .collect::<Result<Vec<_>, safetensors::SafeTensorError>>()?;
    meta.insert(ARCH_KEY.into(), serde_json::to_string(&model.arch)?);
    meta.insert("format".into(), "pt".into());
    safetensors_bytes(views, meta)
}

pub fn save(model: &Model, path: &Path, extra: &[(&str, String)]) -> Result<()> {
    write_atomic(path, &to_bytes(model, extra, None)?)
}

/// A training checkpoint: the model, the optimiser's state and `extra` metadata (step, ...).
pub fn save_training_state(model: &Model, optimizer: &Optimizer, path: &Path, extra: &[(&str, String)]) -> Result<()> {
    write_atomic(path, &to_bytes(model, extra, Some(optimizer))?)
}

/// The architecture stored in a model file's metadata.
pub fn read_architecture(path: &Path, bytes: &[u8]) -> Result<Architecture> {
    let json = metadata(path, bytes)?.remove(ARCH_KEY).with_context(|| {
        format!("{}: no '{ARCH_KEY}' metadata: not written by alexnet (say which architecture with --model)", path.display())
    })?;
    serde_json::from_str(&json).with_context(|| format!("{}: unreadable architecture metadata", path.display()))
}

/// One tensor of the file, checked against the expected shape and converted to our layout.
fn read_tensor(st: &SafeTensors, name: &str, shape: &[usize], layout: &ParamLayout) -> std::result::Result<Vec<f32>, String> {
    let t = st.tensor(name).map_err(|_| format!("missing tensor {name} {shape:?}"))?;
    if t.dtype() != Dtype::F32 {
        return Err(format!("{name}: dtype {:?}, expected F32", t.dtype()));
    }
    if t.shape() != shape {
        return Err(format!("{name}: shape {:?} in file, model expects {shape:?}", t.shape()));
    }
    let torch = f32s_from_bytes(t.data());
    if let Some(i) = torch.iter().position(|x| !x.is_finite()) {
        return Err(format!("{name}: non-finite value at index {i}"));
    }
    Ok(match torch_to_ours(layout, torch.len()) {
        None => torch,
        Some(map) => {
            let mut v = vec![0.0; torch.len()];
            map.iter().zip(&torch).for_each(|(&j, &x)| v[j] = x);
            v
        }
    })
}

/// Every tensor shaped like a parameter (those `wanted`; the others empty), named `prefix` +
/// its name; problems are collected.
fn read_all(st: &SafeTensors, model: &Model, prefix: &str, wanted: impl Fn(&Param) -> bool, problems: &mut Vec<String>) -> Vec<Vec<f32>> {
    model
        .params
        .iter()
        .map(|p| match wanted(p) {
            true => read_tensor(st, &format!("{prefix}{}", p.name), &p.torch_shape, &p.layout).unwrap_or_else(|e| {
                problems.push(e);
                Vec::new()
            }),
            false => Vec::new(),
        })
        .collect()
}

/// Copy the file's tensors into `model` (and, for a training checkpoint, the optimiser's state
/// into `optimizer`), checking every name, shape and dtype first: on any mismatch nothing is
/// changed and the error lists all of them. Without `optimizer`, a training checkpoint's
/// optimiser tensors are ignored, so `eval` and `predict` take either kind of file.
pub fn load_into(model: &mut Model, path: &Path, bytes: &[u8], optimizer: Option<&mut Optimizer>) -> Result<()> {
    let st = SafeTensors::deserialize(bytes).with_context(|| format!("{}: not a valid safetensors file", path.display()))?;
    let mut problems = Vec::new();
    let values = read_all(&st, model, "", |_| true, &mut problems);
    let mut expected: Vec<String> = model.params.iter().map(|p| p.name.clone()).collect();
    let mut slots = Vec::new();
    let mut step = 0;
    if let Some(opt) = &optimizer {
        let meta = metadata(path, bytes)?;
        let kind = serde_json::to_string(&opt.config.kind)?;
        match (meta.get(OPTIMIZER_STEP_KEY).and_then(|s| s.parse::<u64>().ok()), meta.get(OPTIMIZER_KIND_KEY)) {
            (Some(s), Some(k)) if *k == kind => step = s,
            (Some(_), Some(k)) => problems.push(format!("optimizer {k} in file, the run uses {kind}")),
            _ => problems.push("no optimizer state: a model file, not a training checkpoint".into()),
        }
        let used = if opt.slot2.is_empty() { 1 } else { 2 };
        for slot in 1..=used {
            let prefix = slot_prefix(slot);
            // Frozen parameters have no optimiser state.
            slots.push(read_all(&st, model, &prefix, Param::trainable, &mut problems));
            expected.extend(model.params.iter().filter(|p| p.trainable()).map(|p| format!("{prefix}{}", p.name)));
        }
    }
    let mut extra: Vec<&str> = st
        .names()
        .into_iter()
        .filter(|n| !expected.iter().any(|e| e == n) && (optimizer.is_some() || !n.starts_with(OPTIMIZER_PREFIX)))
        .collect();
    extra.sort();
    problems.extend(extra.iter().map(|n| format!("unexpected tensor {n}")));
    if !problems.is_empty() {
        // A file of another architecture mismatches everywhere: name the architecture instead.
        if let Some(declared) = read_architecture(path, bytes).ok().filter(|a| a.name != model.arch.name) {
            bail!("{} holds model {} (its metadata), not {}", path.display(), declared.name, model.arch.name);
        }
        const SHOWN: usize = 8;
        let more = problems.len().saturating_sub(SHOWN);
        problems.truncate(SHOWN);
        if more > 0 {
            problems.push(format!("... and {more} more"));
        }
        bail!("{}: does not match model {}:\n  {}", path.display(), model.arch.name, problems.join("\n  "));
    }
    for (p, v) in model.params.iter_mut().zip(values) {
        p.value = v;
    }
    if let Some(opt) = optimizer {
        let mut slots = slots.into_iter();
        opt.slot1 = slots.next().expect("slot 1 read");
        if let Some(s) = slots.next() {
            opt.slot2 = s;
        }
        opt.step = step;
    }
    Ok(())
}

/// What `init_from` did with a file's tensors.
#[derive(Debug, Default)]
pub struct InitReport {
    pub loaded: Vec<String>,
    /// Parameters that keep their fresh initialisation, each with why.
    pub reinitialised: Vec<String>,
    /// Tensors of the file that no parameter takes.
    pub ignored: Vec<String>,
}

/// Start `model` from a model file: ours, or a PyTorch state dict saved as safetensors
/// (torchvision's `alexnet` names and layouts are `alexnet-owt`'s). Each tensor whose name and
/// shape match a parameter's is loaded, converted to our layout; the other parameters keep their
/// fresh initialisation (the classifier, when the class count differs). A file where nothing
/// matches is refused.
pub fn init_from(model: &mut Model, path: &Path) -> Result<InitReport> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read model file {}", path.display()))?;
    let st = SafeTensors::deserialize(&bytes).with_context(|| format!("{}: not a valid safetensors file", path.display()))?;
    let mut report = InitReport::default();
    for p in &mut model.params {
        match st.tensor(&p.name) {
            Err(_) => report.reinitialised.push(format!("{} (not in the file)", p.name)),
            Ok(t) if t.shape() != p.torch_shape => {
                report.reinitialised.push(format!("{} (file {:?}, model {:?})", p.name, t.shape(), p.torch_shape))
            }
            Ok(_) => {
                p.value = read_tensor(&st, &p.name, &p.torch_shape, &p.layout).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
                report.loaded.push(p.name.clone());
            }
        }
    }
    let mut ignored: Vec<String> =
        st.names().into_iter().filter(|n| !model.params.iter().any(|p| p.name == *n)).map(String::from).collect();
    ignored.sort();
    report.ignored = ignored;
    if report.loaded.is_empty() {
        let names: Vec<&str> = model.params.iter().map(|p| p.name.as_str()).take(4).collect();
        bail!(
            "{}: none of its tensors matches a parameter of model {} by name and shape (the model's are {}, ...)",
            path.display(),
            model.arch.name,
            names.join(", ")
        );
    }
    Ok(report)
}

/// Load a model file: the architecture is `arch` if given (for files written elsewhere, e.g. a
/// PyTorch state dict saved with safetensors), else the one in the file's metadata.
pub fn load(path: &Path, arch: Option<Architecture>) -> Result<Model> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read model file {}", path.display()))?;
    load_bytes(path, &bytes, arch)
}

/// `load` on the file's bytes (`path` names it in errors).
pub fn load_bytes(path: &Path, bytes: &[u8], arch: Option<Architecture>) -> Result<Model> {
    let arch = match arch {
        Some(a) => {
            if let Some(declared) = read_architecture(path, bytes).ok().filter(|d| d.name != a.name) {
                bail!("{} holds model {} (its metadata), not {}: leave out --model", path.display(), declared.name, a.name);
            }
            a
        }
        None => read_architecture(path, bytes)?,
    };
    let params = Model::parameter_count(&arch).with_context(|| format!("{}: invalid architecture", path.display()))?;
    if params.saturating_mul(4) > bytes.len() {
        bail!("{}: {} bytes cannot hold the {params} parameters of model {}", path.display(), bytes.len(), arch.name);
    }
    let mut model = Model::new(&arch).with_context(|| format!("{}: invalid architecture", path.display()))?;
    load_into(&mut model, path, bytes, None)?;
    Ok(model)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::architectures::alexnet_mnist;
    use crate::model::LayerSpec;

    #[test]
    fn round_trips_and_uses_pytorch_layouts() {
        let mut m = Model::new(&alexnet_mnist()).unwrap();
        m.init(5, 0.01);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.safetensors");
        save(&m, &path, &[]).unwrap();
        let back = load(&path, None).unwrap();
        for (a, b) in m.params.iter().zip(&back.params) {
            assert_eq!(a.value, b.value, "{}", a.name);
        }
        // conv1.weight OIHW [64,1,3,3]: torch[o][0][ky][kx] = ours[(ky*3+kx)*64 + o].
        let t = torch_tensors(&m);
        let (name, shape, data) = &t[0];
        assert_eq!((name.as_str(), shape.as_slice()), ("conv1.weight", &[64, 1, 3, 3][..]));
        assert_eq!(data[5 * 9 + 3 + 2], m.params[0].value[(3 + 2) * 64 + 5]);
        // fc1.weight [1024, 4096], input C,H,W: torch[o][ch*16 + y*4 + x] = ours[o][(y*4+x)*256 + ch].
        let fc1 = t.iter().find(|(n, _, _)| n == "fc1.weight").unwrap();
        let ours = &m.params.iter().find(|p| p.name == "fc1.weight").unwrap().value;
        assert_eq!(fc1.2[7 * 4096 + 9 * 16 + 2 * 4 + 3], ours[7 * 4096 + (2 * 4 + 3) * 256 + 9]);
    }

    #[test]
    fn mismatched_checkpoint_lists_every_problem_and_leaves_model_untouched() {
        let mut small = alexnet_mnist();
        if let crate::model::LayerSpec::Linear(fc) = &mut small.layers[12] {
            fc.out = 512;
        }
        let mut m = Model::new(&small).unwrap();
        m.init(1, 0.0);
        let bytes = to_bytes(&m, &[], None).unwrap();
        let mut target = Model::new(&alexnet_mnist()).unwrap();
        let before = target.params[0].value.clone();
        let err = load_into(&mut target, Path::new("small.safetensors"), &bytes, None).unwrap_err().to_string();
        assert!(err.contains("fc1.weight: shape [512, 4096]") && err.contains("fc2.weight: shape [1024, 512]"), "{err}");
        assert_eq!(target.params[0].value, before);
        let err = format!("{:#}", load_into(&mut target, Path::new("junk.bin"), b"not a model", None).unwrap_err());
        assert!(err.contains("junk.bin"), "{err}");
    }

    /// What PyTorch's `safetensors.torch.save_file` writes: the model's tensors in PyTorch
    /// layout and `extra` ones, no alexnet metadata.
    fn write_torch_file(model: &Model, extra: &[(&str, Vec<f32>)], path: &Path) {
        let mut tensors = torch_tensors(model);
        tensors.extend(extra.iter().map(|(n, v)| (n.to_string(), vec![v.len()], v.clone())));
        let bytes: Vec<Vec<u8>> = tensors.iter().map(|(_, _, d)| f32_bytes(d)).collect();
        let views =
            tensors.iter().zip(&bytes).map(|((n, shape, _), b)| (n.clone(), TensorView::new(Dtype::F32, shape.clone(), b).unwrap()));
        std::fs::write(path, safetensors::serialize(views, None).unwrap()).unwrap();
    }

    #[test]
    fn foreign_files_without_metadata_load_with_an_explicit_architecture() {
        let mut m = Model::new(&alexnet_mnist()).unwrap();
        m.init(9, 0.0);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("torch.safetensors");
        write_torch_file(&m, &[], &path);
        let err = format!("{:#}", load(&path, None).unwrap_err());
        assert!(err.contains("--model") && err.contains("torch.safetensors"), "{err}");
        let back = load(&path, Some(alexnet_mnist())).unwrap();
        assert_eq!(back.params[0].value, m.params[0].value);
    }

    /// A PyTorch-layout state dict (no metadata) of a model with 10 classes, into the same
    /// architecture with 7: everything loads but the classifier, which keeps its fresh values;
    /// a file that shares nothing with the model is refused.
    #[test]
    fn init_from_loads_what_matches_and_reinitialises_only_a_resized_classifier() {
        let mut source = Model::new(&alexnet_mnist()).unwrap();
        source.init(9, 0.1);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("torch.safetensors");
        write_torch_file(&source, &[("num_batches_tracked", vec![1.0])], &path);

        let mut arch = alexnet_mnist();
        let Some(LayerSpec::Linear(fc)) = arch.layers.last_mut() else { panic!("a classifier") };
        fc.out = 7;
        let mut target = Model::new(&arch).unwrap();
        target.init(1, 0.0);
        let fresh = target.clone();
        let report = init_from(&mut target, &path).unwrap();
        assert_eq!(report.loaded.len(), 10);
        assert_eq!(report.reinitialised, ["fc3.weight (file [10, 1024], model [7, 1024])", "fc3.bias (file [10], model [7])"]);
        assert_eq!(report.ignored, ["num_batches_tracked"]);
        for ((p, s), f) in target.params.iter().zip(&source.params).zip(&fresh.params) {
            if p.name.starts_with("fc3") {
                assert_eq!(p.value, f.value, "{} keeps its fresh values", p.name);
            } else {
                assert_eq!(p.value, s.value, "{} is the file's, in our layout", p.name);
            }
        }
        let unrelated = dir.path().join("unrelated.safetensors");
        let one = f32_bytes(&[1.0]);
        std::fs::write(&unrelated, safetensors::serialize([("x", TensorView::new(Dtype::F32, vec![1], &one).unwrap())], None).unwrap())
            .unwrap();
        let err = format!("{:#}", init_from(&mut target, &unrelated).unwrap_err());
        assert!(err.contains("unrelated.safetensors") && err.contains("none of its tensors"), "{err}");
    }
}
