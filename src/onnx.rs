//! ONNX export. The graph is NCHW with PyTorch-layout weights (the checkpoint's tensors), so
//! every op is the standard one with exact attributes: TF SAME padding becomes explicit,
//! possibly asymmetric `pads`; LRN's alpha is ours times `size`. Each layer kind writes its own
//! nodes (`Layer::onnx`, through `onnx_graph::OnnxGraph`).

use crate::checkpoint::torch_tensors;
use crate::model::Model;
pub use crate::onnx_graph::OPSET;
use crate::onnx_graph::{GraphProto, IR_VERSION, ModelProto, OnnxGraph, OperatorSetIdProto, batched, int};
use anyhow::Result;
use prost::Message;
use std::path::Path;

/// The inference graph of `model`: input `input` [N, C, H, W], outputs `logits` [N, classes]
/// and `probabilities` (their softmax). Each layer writes its own nodes (`Layer::onnx`).
pub fn to_model(model: &Model) -> ModelProto {
    let mut graph = OnnxGraph::default();
    for (name, shape, data) in torch_tensors(model) {
        graph.constant(&name, &shape, &data);
    }
    let mut cur = "input".to_string();
    for layer in &model.layers {
        let params: Vec<&str> = model.params[layer.params.clone()].iter().map(|p| p.name.as_str()).collect();
        cur = layer.op.onnx(&mut graph, &layer.name, cur, &params);
    }
    graph.node("Identity", "logits", vec![cur], vec![]);
    graph.node("Softmax", "probabilities", vec!["logits".into()], vec![int("axis", 1)]);
    let [h, w, c] = model.arch.input;
    let classes = model.classes();
    let graph = GraphProto {
        node: graph.nodes,
        name: Some(model.arch.name.clone()),
        initializer: graph.initializers,
        input: vec![batched("input", &[c, h, w])],
        output: vec![batched("logits", &[classes]), batched("probabilities", &[classes])],
    };
    ModelProto {
        ir_version: Some(IR_VERSION),
        producer_name: Some("alexnet".into()),
        producer_version: Some(env!("CARGO_PKG_VERSION").into()),
        graph: Some(graph),
        opset_import: vec![OperatorSetIdProto { domain: Some(String::new()), version: Some(OPSET) }],
    }
}

/// Write `model` as an ONNX file (atomically, like every model file).
pub fn export(model: &Model, path: &Path) -> Result<()> {
    crate::files::write_atomic(path, &to_model(model).encode_to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::architectures::alexnet_mnist;

    #[test]
    fn seed_model_graph_has_exact_tf_same_pads_and_onnx_lrn_alpha() {
        let m = Model::new(&alexnet_mnist()).unwrap();
        let onnx = to_model(&m);
        let bytes = onnx.encode_to_vec();
        assert_eq!(ModelProto::decode(&bytes[..]).unwrap(), onnx, "round trip through the wire format");
        let graph = onnx.graph.unwrap();
        let attr = |node: &str, a: &str| {
            let n = graph.node.iter().find(|n| n.name.as_deref() == Some(node)).unwrap_or_else(|| panic!("no node {node}"));
            n.attribute.iter().find(|x| x.name.as_deref() == Some(a)).unwrap().clone()
        };
        // 28 -> 14 and 14 -> 7 pad only at the end; 7 -> 4 pads both sides (see `Padding::Same`).
        assert_eq!(attr("pool1", "pads").ints, vec![0, 0, 1, 1]);
        assert_eq!(attr("pool2", "pads").ints, vec![0, 0, 1, 1]);
        assert_eq!(attr("pool3", "pads").ints, vec![1, 1, 1, 1]);
        assert_eq!(attr("conv1", "pads").ints, vec![1, 1, 1, 1]);
        assert_eq!(attr("lrn1", "size").i, Some(9));
        assert!((attr("lrn1", "alpha").f.unwrap() - 0.001).abs() < 1e-9, "ONNX alpha = TF alpha x size");
        let ops: Vec<&str> = graph.node.iter().map(|n| n.op_type.as_deref().unwrap()).collect();
        assert!(!ops.contains(&"Dropout") && ops.iter().filter(|&&o| o == "Gemm").count() == 3, "{ops:?}");
        assert_eq!(graph.initializer.len(), m.params.len());
        assert_eq!(graph.initializer[0].dims, vec![64, 1, 3, 3]);
    }
}
