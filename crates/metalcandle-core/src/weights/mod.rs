//! Checkpoints: tensor names per architecture, Hugging Face safetensors folders in and out,
//! and seeded initialisation for models trained from scratch.

pub mod hf;
pub mod init;
pub mod names;
pub mod reader;

pub use hf::{load_hf_folder, load_hf_folder_as, save_hf_folder, write_atomic};
pub use init::init_tensors;
