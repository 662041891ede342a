//! ONNX graphs as the layers write them. The messages below are the subset of `onnx.proto`
//! (proto2) that an inference graph of this engine's layers needs, declared with their field
//! numbers and encoded by `prost`: no protoc, no generated code. Each layer kind adds its own
//! nodes through `OnnxGraph` (`Layer::onnx`); `onnx` assembles the model's graph.

use prost::Message;

/// The opset the graph is written against: Gemm, Flatten and Softmax in their 13 forms.
pub const OPSET: i64 = 13;
/// IR version 7 is the one that introduced opset 13 support.
pub const IR_VERSION: i64 = 7;
pub const FLOAT: i32 = 1;
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
pub fn batched(name: &str, dims: &[usize]) -> ValueInfoProto {
    let mut dim = vec![Dimension { dim_param: Some("N".into()), ..Default::default() }];
    dim.extend(dims.iter().map(|&d| Dimension { dim_value: Some(d as i64), ..Default::default() }));
    let tensor_type = TensorTypeProto { elem_type: Some(FLOAT), shape: Some(TensorShapeProto { dim }) };
    ValueInfoProto { name: Some(name.into()), r#type: Some(TypeProto { tensor_type: Some(tensor_type) }) }
}

/// The graph as the layers write it (`Layer::onnx`): nodes and constant tensors.
#[derive(Default)]
pub struct OnnxGraph {
    pub nodes: Vec<NodeProto>,
    pub initializers: Vec<TensorProto>,
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
