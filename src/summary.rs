//! The layer table of a model: output shape, neurons, weight shape and parameter counts.

use crate::model::{Layer, Model};
use std::fmt::Write;

pub struct Totals {
    /// Outputs of the conv and FC layers (the paper's "neurons").
    pub neurons: usize,
    /// Weights without biases.
    pub weights: usize,
    /// Weights and biases.
    pub parameters: usize,
}

pub fn totals(model: &Model) -> Totals {
    let mut t = Totals { neurons: 0, weights: 0, parameters: 0 };
    for (layer, shape) in model.layers.iter().zip(&model.shapes[1..]) {
        if let Layer::Conv { param, .. } | Layer::Linear { param, .. } = layer {
            t.neurons += shape.iter().product::<usize>();
            t.weights += model.params[*param].value.len();
            t.parameters += model.params[*param].value.len() + model.params[param + 1].value.len();
        }
    }
    t
}

/// Display names of the layers: conv1, pool1, lrn1, dropout1, ..., fc3.
pub fn layer_names(model: &Model) -> Vec<String> {
    let mut counts = std::collections::HashMap::new();
    model
        .layers
        .iter()
        .map(|layer| match layer {
            Layer::Conv { param, .. } | Layer::Linear { param, .. } => model.params[*param].name.trim_end_matches(".weight").to_string(),
            other => {
                let kind = match other {
                    Layer::Pool(_) => "pool",
                    Layer::Lrn { .. } => "lrn",
                    _ => "dropout",
                };
                let n = counts.entry(kind).or_insert(0);
                *n += 1;
                format!("{kind}{n}")
            }
        })
        .collect()
}

pub fn table(model: &Model) -> String {
    let mut s = String::new();
    let [h, w, c] = model.arch.input;
    writeln!(s, "Model {}: input {h}x{w}x{c}", model.arch.name).unwrap();
    writeln!(s, "{:<10} {:>14} {:>10} {:>18} {:>12}", "layer", "output", "neurons", "weight shape", "parameters").unwrap();
    for ((layer, [h, w, c]), name) in model.layers.iter().zip(&model.shapes[1..]).zip(layer_names(model)) {
        let weight = match layer {
            Layer::Conv { param, .. } | Layer::Linear { param, .. } => {
                let p = &model.params[*param];
                Some((p.torch_shape.clone(), p.value.len() + model.params[param + 1].value.len()))
            }
            _ => None,
        };
        let (shape, params) = weight.map_or((String::new(), String::new()), |(s, n)| {
            (s.iter().map(|d| d.to_string()).collect::<Vec<_>>().join("x"), n.to_string())
        });
        writeln!(s, "{:<10} {:>14} {:>10} {:>18} {:>12}", name, format!("{h}x{w}x{c}"), h * w * c, shape, params).unwrap();
    }
    let t = totals(model);
    writeln!(s, "total: {} neurons (conv and FC outputs), {} weights, {} parameters with biases", t.neurons, t.weights, t.parameters)
        .unwrap();
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::alexnet_mnist;

    #[test]
    fn seed_model_totals() {
        let m = Model::new(&alexnet_mnist(0.8)).unwrap();
        let t = totals(&m);
        // neurons: 28*28*64 + 14*14*128 + 7*7*256 + 1024 + 1024 + 10
        assert_eq!(t.neurons, 50176 + 25088 + 12544 + 2058);
        assert_eq!(t.weights, 576 + 73728 + 294912 + 4194304 + 1048576 + 10240);
        assert_eq!(t.parameters, 5_624_842);
        assert!(table(&m).contains("fc1") && table(&m).contains("1024x4096"));
    }
}
