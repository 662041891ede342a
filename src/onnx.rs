//! ONNX export. The messages below are the subset of `onnx.proto` (proto2) that an inference
//! graph of this engine's layers needs, declared with their field numbers and encoded by
//! `prost`: no protoc, no generated code. The graph is NCHW with PyTorch-layout weights (the
//! checkpoint's tensors), so every op is the standard one with exact attributes: TF SAME
//! padding becomes explicit, possibly asymmetric `pads`; LRN's alpha is ours times `size`.
//! Each layer kind writes its own nodes (`Layer::onnx`) through `OnnxGraph`.

use crate::checkpoint::torch_tensors;
use crate::model::Model;
use anyhow::Result;
use prost::Message;
use std::path::Path;

/// The opset the graph is written against: Gemm, Flatten and Softmax in their 13 forms.
pub const OPSET: i64 = 13;
/// IR version 7 is the one that introduced opset 13 support.
const IR_VERSION: i64 = 7;
const FLOAT: i32 = 1;
const INT64: i32 = 7;

#[derive(Clone, PartialEq, Message)]
pub struct ModelProto {
    #[prost(int64, optional, tag = "1")]
    pub ir_version: Option<i64>,
    #[prost(string, optional, tag = "2")]
    pub producer_name: Option<String>,
    #[prost(string, optional, tag = "3")]
    pub producer_version: Option<String>,
    #[prost(message, optional, tag = "7")]
    pub graph: Option<GraphProto>,
    #[prost(message, repeated, tag = "8")]
    pub opset_import: Vec<OperatorSetIdProto>,
}

#[derive(Clone, PartialEq, Message)]
pub struct OperatorSetIdProto {
    #[prost(string, optional, tag = "1")]
    pub domain: Option<String>,
    #[prost(int64, optional, tag = "2")]
    pub version: Option<i64>,
}

#[derive(Clone, PartialEq, Message)]
pub struct GraphProto {
    #[prost(message, repeated, tag = "1")]
    pub node: Vec<NodeProto>,
    #[prost(string, optional, tag = "2")]
    pub name: Option<String>,
    #[prost(message, repeated, tag = "5")]
    pub initializer: Vec<TensorProto>,
    #[prost(message, repeated, tag = "11")]
    pub input: Vec<ValueInfoProto>,
    #[prost(message, repeated, tag = "12")]
    pub output: Vec<ValueInfoProto>,
}

#[derive(Clone, PartialEq, Message)]
pub struct NodeProto {
    #[prost(string, repeated, tag = "1")]
    pub input: Vec<String>,
    #[prost(string, repeated, tag = "2")]
    pub output: Vec<String>,
    #[prost(string, optional, tag = "3")]
    pub name: Option<String>,
    #[prost(string, optional, tag = "4")]
    pub op_type: Option<String>,
    #[prost(message, repeated, tag = "5")]
    pub attribute: Vec<AttributeProto>,
}

/// `type`: 1 FLOAT, 2 INT, 7 INTS (AttributeProto.AttributeType).
#[derive(Clone, PartialEq, Message)]
pub struct AttributeProto {
    #[prost(string, optional, tag = "1")]
    pub name: Option<String>,
    #[prost(float, optional, tag = "2")]
    pub f: Option<f32>,
    #[prost(int64, optional, tag = "3")]
    pub i: Option<i64>,
    #[prost(int64, repeated, packed = "false", tag = "8")]
    pub ints: Vec<i64>,
    #[prost(int32, optional, tag = "20")]
    pub r#type: Option<i32>,
}

#[derive(Clone, PartialEq, Message)]
pub struct TensorProto {
    #[prost(int64, repeated, packed = "false", tag = "1")]
    pub dims: Vec<i64>,
    #[prost(int32, optional, tag = "2")]
    pub data_type: Option<i32>,
    #[prost(string, optional, tag = "8")]
    pub name: Option<String>,
    #[prost(bytes = "vec", optional, tag = "9")]
    pub raw_data: Option<Vec<u8>>,
}

#[derive(Clone, PartialEq, Message)]
pub struct ValueInfoProto {
    #[prost(string, optional, tag = "1")]
    pub name: Option<String>,
    #[prost(message, optional, tag = "2")]
    pub r#type: Option<TypeProto>,
}

/// `TypeProto`'s `oneof value` with only its `tensor_type` arm (same wire format).
#[derive(Clone, PartialEq, Message)]
pub struct TypeProto {
    #[prost(message, optional, tag = "1")]
    pub tensor_type: Option<TensorTypeProto>,
}

#[derive(Clone, PartialEq, Message)]
pub struct TensorTypeProto {
    #[prost(int32, optional, tag = "1")]
    pub elem_type: Option<i32>,
    #[prost(message, optional, tag = "2")]
    pub shape: Option<TensorShapeProto>,
}

#[derive(Clone, PartialEq, Message)]
pub struct TensorShapeProto {
    #[prost(message, repeated, tag = "1")]
    pub dim: Vec<Dimension>,
}

/// `oneof value { dim_value = 1; dim_param = 2; }`: exactly one is set.
#[derive(Clone, PartialEq, Message)]
pub struct Dimension {
    #[prost(int64, optional, tag = "1")]
    pub dim_value: Option<i64>,
    #[prost(string, optional, tag = "2")]
    pub dim_param: Option<String>,
}

pub fn int(name: &str, v: i64) -> AttributeProto {
    AttributeProto { name: Some(name.into()), i: Some(v), r#type: Some(2), ..Default::default() }
}

pub fn ints(name: &str, v: &[usize]) -> AttributeProto {
    AttributeProto { name: Some(name.into()), ints: v.iter().map(|&x| x as i64).collect(), r#type: Some(7), ..Default::default() }
}

pub fn float(name: &str, v: f32) -> AttributeProto {
    AttributeProto { name: Some(name.into()), f: Some(v), r#type: Some(1), ..Default::default() }
}

/// A float tensor value with a symbolic batch dimension `N`.
fn batched(name: &str, dims: &[usize]) -> ValueInfoProto {
    let mut dim = vec![Dimension { dim_param: Some("N".into()), ..Default::default() }];
    dim.extend(dims.iter().map(|&d| Dimension { dim_value: Some(d as i64), ..Default::default() }));
    let tensor_type = TensorTypeProto { elem_type: Some(FLOAT), shape: Some(TensorShapeProto { dim }) };
    ValueInfoProto { name: Some(name.into()), r#type: Some(TypeProto { tensor_type: Some(tensor_type) }) }
}

/// ONNX `pads` for a window: [top, left, bottom, right], the end pads being whatever the
/// output size needs (TF SAME puts the odd one there).
pub fn pads(win: &crate::layers::Window) -> Vec<usize> {
    let after = |a: &crate::layers::Axis| ((a.output - 1) * win.stride + win.kernel).saturating_sub(a.input + a.pad_before);
    vec![win.h.pad_before, win.w.pad_before, after(&win.h), after(&win.w)]
}

/// The graph as the layers write it (`Layer::onnx`): nodes and constant tensors.
#[derive(Default)]
pub struct OnnxGraph {
    nodes: Vec<NodeProto>,
    initializers: Vec<TensorProto>,
    /// Whether the current value has been flattened to [N, features] already.
    flat: bool,
}

impl OnnxGraph {
    /// Append a node whose one output is named after it; returns that name.
    pub fn node(&mut self, op: &str, name: &str, input: Vec<String>, attribute: Vec<AttributeProto>) -> String {
        let output = vec![name.to_string()];
        self.nodes.push(NodeProto { input, output, name: Some(name.into()), op_type: Some(op.into()), attribute });
        name.to_string()
    }

    /// A constant tensor (an initialiser); returns its name.
    pub fn constant(&mut self, name: &str, dims: &[usize], data: &[f32]) -> String {
        self.tensor(name, dims, FLOAT, crate::files::f32_bytes(data))
    }

    /// A constant int64 vector (shapes for `Reshape`); returns its name.
    pub fn constant_i64(&mut self, name: &str, values: &[i64]) -> String {
        self.tensor(name, &[values.len()], INT64, values.iter().flat_map(|v| v.to_le_bytes()).collect())
    }

    fn tensor(&mut self, name: &str, dims: &[usize], data_type: i32, raw: Vec<u8>) -> String {
        self.initializers.push(TensorProto {
            dims: dims.iter().map(|&d| d as i64).collect(),
            data_type: Some(data_type),
            name: Some(name.into()),
            raw_data: Some(raw),
        });
        name.to_string()
    }

    /// `input` as [N, features]: a `Flatten` node the first time a layer needs it.
    pub fn flattened(&mut self, name: &str, input: String) -> String {
        if self.flat {
            return input;
        }
        self.flat = true;
        self.node("Flatten", &format!("{name}.flatten"), vec![input], vec![int("axis", 1)])
    }
}

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
