//! The decoder's building blocks on candle tensors.

pub mod attention;
pub mod embedding;
pub mod linear;
pub mod mask;
pub mod mlp;
pub mod norm;
pub mod quantized_matrix;
pub mod rope;
pub mod weight;

pub use attention::{Attention, LayerCache};
pub use embedding::Embedding;
pub use linear::Linear;
pub use mlp::Mlp;
pub use norm::Norm;
pub use quantized_matrix::QuantizedMatrix;
pub use weight::Weight;
