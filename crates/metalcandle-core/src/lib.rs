//! metalcandle-core: decoder-only transformers on candle, with the kernels training needs.

pub mod engine;
pub mod error;
pub mod hooks;
pub mod limits;
pub mod lora;
pub mod model;
pub mod nn;
pub mod ops;
pub mod optim;
pub mod quant;
pub mod reduce;
pub mod rng;
pub mod spec;
pub mod train;
pub mod weights;

#[cfg(test)]
mod device_path_tests;
#[cfg(test)]
mod testing;

pub use error::{Error, Result};
pub use model::{Decoder, ForwardOptions, KvCache};
pub use spec::ModelSpec;
