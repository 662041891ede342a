//! The layer table of a model: output shape, neurons, weight shape and parameter counts.

use crate::model::Model;
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
    for (layer, shape) in model.layers.iter().zip(&model.shapes[1..]).filter(|(l, _)| !l.params.is_empty()) {
        let params = &model.params[layer.params.clone()];
        t.neurons += shape.iter().product::<usize>();
        t.weights += params.iter().filter(|p| p.decay).map(|p| p.value.len()).sum::<usize>();
        t.parameters += params.iter().map(|p| p.value.len()).sum::<usize>();
    }
    t
}

pub fn table(model: &Model) -> String {
    let mut s = String::new();
    let [h, w, c] = model.arch.input;
    writeln!(s, "Model {}: input {h}x{w}x{c}", model.arch.name).unwrap();
    writeln!(s, "{:<13} {:>14} {:>10} {:>18} {:>12}", "layer", "output", "neurons", "weight shape", "parameters").unwrap();
    for (layer, [h, w, c]) in model.layers.iter().zip(&model.shapes[1..]) {
        let params = &model.params[layer.params.clone()];
        let (shape, count) = match params.first() {
            Some(weight) => (
                weight.torch_shape.iter().map(|d| d.to_string()).collect::<Vec<_>>().join("x"),
                params.iter().map(|p| p.value.len()).sum::<usize>().to_string(),
            ),
            None => (String::new(), String::new()),
        };
        writeln!(s, "{:<13} {:>14} {:>10} {:>18} {:>12}", layer.name, format!("{h}x{w}x{c}"), h * w * c, shape, count).unwrap();
    }
    let t = totals(model);
    writeln!(s, "total: {} neurons (conv and FC outputs), {} weights, {} parameters with biases", t.neurons, t.weights, t.parameters)
        .unwrap();
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::architectures::{alexnet_mnist, architecture, with_input_size};

    #[test]
    fn seed_model_totals() {
        let m = Model::new(&alexnet_mnist()).unwrap();
        let t = totals(&m);
        // neurons: 28*28*64 + 14*14*128 + 7*7*256 + 1024 + 1024 + 10
        assert_eq!(t.neurons, 50176 + 25088 + 12544 + 2058);
        assert_eq!(t.weights, 576 + 73728 + 294912 + 4194304 + 1048576 + 10240);
        assert_eq!(t.parameters, 5_624_842);
        assert!(table(&m).contains("fc1") && table(&m).contains("1024x4096"));
    }

    #[test]
    fn paper_models_match_the_published_counts() {
        let count = |name: &str| totals(&Model::new(&architecture(name, None).unwrap()).unwrap());
        // The paper's table: 659,272 neurons, 62,367,776 weights (62,378,344 with biases).
        let t = count("alexnet");
        assert_eq!((t.neurons, t.weights, t.parameters), (659_272, 62_367_776, 62_378_344));
        // The two-tower model as published (Caffe's bvlc_alexnet) and torchvision's alexnet.
        assert_eq!(count("alexnet-2gpu").parameters, 60_965_224);
        assert_eq!(count("alexnet-owt").parameters, 61_100_840);
        // Its adaptive pooling keeps the classifier's shape from 63x63 up; 62 leaves pool5 nothing.
        for side in [63, 100, 256, 320] {
            let arch = with_input_size(architecture("alexnet-owt", None).unwrap(), Some(side)).unwrap();
            assert_eq!(totals(&Model::new(&arch).unwrap()).parameters, 61_100_840, "{side}x{side}");
        }
        let err = format!("{:#}", with_input_size(architecture("alexnet-owt", None).unwrap(), Some(62)).unwrap_err());
        assert!(err.contains("--input-size 62") && err.contains("does not fit input 2x2x256"), "{err}");
        assert!(table(&Model::new(&architecture("alexnet-owt", None).unwrap()).unwrap()).contains("avgpool1"));
        let m = Model::new(&architecture("alexnet-owt", Some(37)).unwrap()).unwrap();
        assert_eq!(m.classes(), 37);
        let names: Vec<&str> = m.params.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(names.first(), Some(&"features.0.weight"));
        assert_eq!(names.last(), Some(&"classifier.6.bias"));
        assert!(table(&Model::new(&architecture("alexnet", None).unwrap()).unwrap()).contains("55x55x96"));
        // The paper's init: biases 1 in conv2, conv4, conv5, fc6, fc7; weights N(0, 0.01).
        let mut m = Model::new(&architecture("alexnet-2gpu", Some(10)).unwrap()).unwrap();
        m.init(1, 0.0);
        let bias = |name: &str| m.params.iter().find(|p| p.name == name).unwrap().value[0];
        assert_eq!(
            [bias("conv1.bias"), bias("conv2.bias"), bias("conv3.bias"), bias("fc7.bias"), bias("fc8.bias")],
            [0.0, 1.0, 0.0, 1.0, 0.0]
        );
        let w = &m.params.iter().find(|p| p.name == "fc6.weight").unwrap().value;
        let std = (w.iter().map(|v| (v * v) as f64).sum::<f64>() / w.len() as f64).sqrt();
        assert!((std - 0.01).abs() < 1e-4, "{std}");
    }
}
