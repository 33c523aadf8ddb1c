//! ONNX protobuf in, plain Rust out: loading and saving `ModelProto`, reading
//! constant tensors, and an index of who produces and who consumes each tensor.
//!
//! The protobuf types are tract-onnx's prost-generated ones (`tract_onnx::pb`);
//! everything above this file works on names, shapes and `Vec<f32>` so that the
//! detection logic never touches wire-format details.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{Context, Result, bail};
use prost::Message;
pub use tract_onnx::pb;
use pb::tensor_proto::DataType;
use pb::tensor_shape_proto::dimension::Value as DimValue;

/// Reads and decodes an ONNX file. Errors are one sentence naming the file.
pub fn load_model(path: &Path) -> Result<pb::ModelProto> {
    let bytes = crate::fsutil::read_regular(path).with_context(|| format!("cannot read the model {}", path.display()))?;
    decode_model(&bytes).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
}

/// Decodes ONNX bytes; the error says whether the bytes are not ONNX at all,
/// truncated, or ONNX without a graph.
pub fn decode_model(bytes: &[u8]) -> Result<pb::ModelProto> {
    if bytes.is_empty() {
        bail!("the file is empty, not an ONNX model");
    }
    let model = pb::ModelProto::decode(bytes).map_err(|e| {
        anyhow::anyhow!("not a valid ONNX model (the protobuf does not decode: {e}; is the file truncated or of another format?)")
    })?;
    // Arbitrary bytes occasionally decode as a protobuf; a real export always has
    // an IR version, an opset and a graph with nodes.
    let has_graph = model.graph.as_ref().is_some_and(|g| !g.node.is_empty());
    if model.ir_version == 0 || model.opset_import.is_empty() || !has_graph {
        bail!("not an ONNX model (no IR version, opset or graph nodes found; is the file truncated or of another format?)");
    }
    Ok(model)
}

pub fn encode_model(model: &pb::ModelProto) -> Vec<u8> {
    model.encode_to_vec()
}

/// The default-domain opset version of a model.
pub fn opset(model: &pb::ModelProto) -> i64 {
    model
        .opset_import
        .iter()
        .find(|o| o.domain.is_empty() || o.domain == "ai.onnx")
        .map(|o| o.version)
        .unwrap_or(0)
}

pub fn metadata<'a>(model: &'a pb::ModelProto, key: &str) -> Option<&'a str> {
    model.metadata_props.iter().find(|p| p.key == key).map(|p| p.value.as_str())
}

/// A dimension of a tensor shape: known, or a symbol such as `batch`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(untagged)]
pub enum Dim {
    Fixed(i64),
    Symbol(String),
}

impl Dim {
    pub fn fixed(&self) -> Option<i64> {
        match self {
            Dim::Fixed(v) => Some(*v),
            Dim::Symbol(_) => None,
        }
    }
}

impl std::fmt::Display for Dim {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Dim::Fixed(v) => write!(f, "{v}"),
            Dim::Symbol(s) => write!(f, "{s}"),
        }
    }
}

pub fn value_info_shape(vi: &pb::ValueInfoProto) -> Option<Vec<Dim>> {
    let ty = vi.r#type.as_ref()?;
    let pb::type_proto::Value::TensorType(t) = ty.value.as_ref()?;
    let shape = t.shape.as_ref()?;
    Some(
        shape
            .dim
            .iter()
            .enumerate()
            .map(|(i, d)| match &d.value {
                Some(DimValue::DimValue(v)) if *v > 0 => Dim::Fixed(*v),
                Some(DimValue::DimParam(s)) if !s.is_empty() => Dim::Symbol(s.clone()),
                _ => Dim::Symbol(format!("d{i}")),
            })
            .collect(),
    )
}

/// A float tensor `ValueInfoProto` with the given shape.
pub fn float_value_info(name: &str, shape: &[Dim]) -> pb::ValueInfoProto {
    let dim = shape
        .iter()
        .map(|d| pb::tensor_shape_proto::Dimension {
            denotation: String::new(),
            value: Some(match d {
                Dim::Fixed(v) => DimValue::DimValue(*v),
                Dim::Symbol(s) => DimValue::DimParam(s.clone()),
            }),
        })
        .collect();
    pb::ValueInfoProto {
        name: name.to_string(),
        r#type: Some(pb::TypeProto {
            denotation: String::new(),
            value: Some(pb::type_proto::Value::TensorType(pb::type_proto::Tensor {
                elem_type: DataType::Float as i32,
                shape: Some(pb::TensorShapeProto { dim }),
            })),
        }),
        ..Default::default()
    }
}

/// A constant tensor read out of the graph, as f64 for uniform handling of
/// float and integer constants (they are small: shapes, grids, anchors).
#[derive(Debug, Clone, PartialEq)]
pub struct ConstTensor {
    pub dims: Vec<usize>,
    pub values: Vec<f64>,
}

impl ConstTensor {
    pub fn scalar(&self) -> Option<f64> {
        (self.values.len() == 1).then(|| self.values[0])
    }
}

/// Decodes the numeric contents of a `TensorProto` (raw little-endian bytes or
/// the typed repeated fields, whichever the exporter used).
pub fn tensor_values(t: &pb::TensorProto) -> Result<ConstTensor> {
    let dims: Vec<usize> = t.dims.iter().map(|&d| d.max(0) as usize).collect();
    let n: usize = dims.iter().product();
    if t.data_location == Some(1) {
        bail!("tensor `{}` uses external data, which is not supported", t.name);
    }
    let raw = &t.raw_data;
    let dt = DataType::try_from(t.data_type).unwrap_or(DataType::Undefined);
    let values: Vec<f64> = match dt {
        DataType::Float if !raw.is_empty() => raw.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap()) as f64).collect(),
        DataType::Float => t.float_data.iter().map(|&v| v as f64).collect(),
        DataType::Double if !raw.is_empty() => raw.chunks_exact(8).map(|c| f64::from_le_bytes(c.try_into().unwrap())).collect(),
        DataType::Double => t.double_data.clone(),
        DataType::Float16 if !raw.is_empty() => {
            raw.chunks_exact(2).map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f64()).collect()
        }
        DataType::Float16 => t.int32_data.iter().map(|&v| half::f16::from_bits(v as u16).to_f64()).collect(),
        DataType::Int64 if !raw.is_empty() => raw.chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().unwrap()) as f64).collect(),
        DataType::Int64 => t.int64_data.iter().map(|&v| v as f64).collect(),
        DataType::Int32 if !raw.is_empty() => raw.chunks_exact(4).map(|c| i32::from_le_bytes(c.try_into().unwrap()) as f64).collect(),
        DataType::Int32 => t.int32_data.iter().map(|&v| v as f64).collect(),
        other => bail!("tensor `{}` has unsupported element type {other:?}", t.name),
    };
    if values.len() != n {
        bail!("tensor `{}` holds {} values for shape {:?}", t.name, values.len(), dims);
    }
    Ok(ConstTensor { dims, values })
}

/// The float data of a tensor as f32, the element type of weights.
pub fn tensor_f32(t: &pb::TensorProto) -> Result<(Vec<usize>, Vec<f32>)> {
    let c = tensor_values(t)?;
    Ok((c.dims, c.values.into_iter().map(|v| v as f32).collect()))
}

/// A float32 `TensorProto` with raw little-endian data.
pub fn float_tensor(name: &str, dims: &[usize], data: &[f32]) -> pb::TensorProto {
    pb::TensorProto {
        name: name.to_string(),
        dims: dims.iter().map(|&d| d as i64).collect(),
        data_type: DataType::Float as i32,
        raw_data: bytemuck::cast_slice(data).to_vec(),
        ..Default::default()
    }
}

pub fn attr<'a>(node: &'a pb::NodeProto, name: &str) -> Option<&'a pb::AttributeProto> {
    node.attribute.iter().find(|a| a.name == name)
}

pub fn attr_ints(node: &pb::NodeProto, name: &str) -> Option<Vec<i64>> {
    attr(node, name).map(|a| a.ints.clone())
}

/// Producers, consumers and constants of a graph, by tensor name.
pub struct GraphIndex<'g> {
    pub graph: &'g pb::GraphProto,
    /// tensor name -> index of the node that outputs it
    pub producer: HashMap<&'g str, usize>,
    /// tensor name -> indices of nodes that read it
    pub consumers: HashMap<&'g str, Vec<usize>>,
    pub initializers: HashMap<&'g str, &'g pb::TensorProto>,
}

impl<'g> GraphIndex<'g> {
    pub fn new(graph: &'g pb::GraphProto) -> Self {
        let mut producer = HashMap::new();
        let mut consumers: HashMap<&str, Vec<usize>> = HashMap::new();
        for (i, n) in graph.node.iter().enumerate() {
            for o in &n.output {
                producer.insert(o.as_str(), i);
            }
            for inp in &n.input {
                if !inp.is_empty() {
                    consumers.entry(inp.as_str()).or_default().push(i);
                }
            }
        }
        let initializers = graph.initializer.iter().map(|t| (t.name.as_str(), t)).collect();
        GraphIndex { graph, producer, consumers, initializers }
    }

    pub fn node(&self, i: usize) -> &'g pb::NodeProto {
        &self.graph.node[i]
    }

    pub fn producer_of(&self, tensor: &str) -> Option<usize> {
        self.producer.get(tensor).copied()
    }

    pub fn consumers_of(&self, tensor: &str) -> &[usize] {
        self.consumers.get(tensor).map(Vec::as_slice).unwrap_or(&[])
    }

    /// The value of a tensor when it is a constant: an initializer, a Constant
    /// node, or such a constant passed through shape-preserving or broadcasting
    /// ops (Identity, Cast, Expand, Reshape, Unsqueeze) whose other inputs only
    /// decide the shape. Expand and Reshape keep the source values, which is all
    /// that the anchor and stride readers need.
    pub fn constant(&self, tensor: &str) -> Option<ConstTensor> {
        if let Some(t) = self.initializers.get(tensor) {
            return tensor_values(t).ok();
        }
        let node = self.node(self.producer_of(tensor)?);
        match node.op_type.as_str() {
            "Constant" => {
                let a = attr(node, "value")?;
                if let Some(t) = &a.t {
                    return tensor_values(t).ok();
                }
                None
            }
            "Identity" | "Cast" | "Expand" | "Reshape" | "Unsqueeze" | "Squeeze" => self.constant(node.input.first()?),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raw_and_typed_tensors_decode_alike() {
        let raw = float_tensor("a", &[2], &[1.5, -2.0]);
        let typed = pb::TensorProto { name: "b".into(), dims: vec![2], data_type: DataType::Float as i32, float_data: vec![1.5, -2.0], ..Default::default() };
        assert_eq!(tensor_values(&raw).unwrap().values, vec![1.5, -2.0]);
        assert_eq!(tensor_values(&typed).unwrap().values, vec![1.5, -2.0]);
        let ints = pb::TensorProto { dims: vec![3], data_type: DataType::Int64 as i32, int64_data: vec![1, 3, 85], ..Default::default() };
        assert_eq!(tensor_values(&ints).unwrap().values, vec![1.0, 3.0, 85.0]);
    }

    #[test]
    fn garbage_is_not_onnx() {
        assert!(decode_model(b"").is_err());
        assert!(decode_model(b"hello, this is plain text and not a protobuf at all").is_err());
    }
}
