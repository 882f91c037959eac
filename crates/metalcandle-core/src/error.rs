//! One error type for the core, whose messages name the file, key or tensor at fault.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A configuration (config.json, spec) is missing a key, has a wrong value or contradicts itself.
    #[error("{context}: key `{key}`: {msg}")]
    Config {
        context: String,
        key: String,
        msg: String,
    },

    /// Checkpoint tensors missing, unexpected or of the wrong shape.
    #[error("{0}")]
    Weights(String),

    /// A caller passed inputs the model cannot take (shape, dtype, id range).
    #[error("{0}")]
    Input(String),

    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },

    #[error("file not found: {0}")]
    NotFound(PathBuf),

    #[error(transparent)]
    Candle(#[from] candle_core::Error),

    #[error("{0}")]
    Msg(String),
}

impl Error {
    pub fn config(
        context: impl Into<String>,
        key: impl Into<String>,
        msg: impl Into<String>,
    ) -> Self {
        Error::Config {
            context: context.into(),
            key: key.into(),
            msg: msg.into(),
        }
    }

    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        if source.kind() == std::io::ErrorKind::NotFound {
            return Error::NotFound(path.into());
        }
        Error::Io {
            path: path.into(),
            source,
        }
    }
}

pub type Result<T> = std::result::Result<T, Error>;

#[macro_export]
macro_rules! input_err {
    ($($arg:tt)*) => { $crate::Error::Input(format!($($arg)*)) };
}
