//! metalcandle-core: decoder-only transformers on candle, with the kernels training needs.

pub mod error;
pub mod model;
pub mod nn;
pub mod ops;
pub mod rng;
pub mod spec;
pub mod weights;

pub use error::{Error, Result};
pub use spec::ModelSpec;
pub use model::{Decoder, ForwardOptions, KvCache};
