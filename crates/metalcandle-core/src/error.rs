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
    Candle(candle_core::Error),

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

/// Our errors raised inside a candle op (a hook, an observer) travel through candle wrapped,
/// not as text, so they come back out with their kind (an input error stays one).
impl From<Error> for candle_core::Error {
    fn from(e: Error) -> Self {
        match e {
            Error::Candle(c) => c,
            other => candle_core::Error::WrappedContext {
                wrapped: Box::new(other),
                context: String::new(),
            },
        }
    }
}

impl From<candle_core::Error> for Error {
    fn from(e: candle_core::Error) -> Self {
        match e {
            candle_core::Error::WithBacktrace { inner, .. } => Error::from(*inner),
            candle_core::Error::WrappedContext { wrapped, context } => {
                match wrapped.downcast::<Error>() {
                    Ok(ours) => *ours,
                    Err(wrapped) => {
                        Error::Candle(candle_core::Error::WrappedContext { wrapped, context })
                    }
                }
            }
            other => Error::Candle(other),
        }
    }
}

pub type Result<T> = std::result::Result<T, Error>;
