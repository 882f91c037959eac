"""metalcandle: train and fine-tune small decoder-only transformers on a Rust core."""

from metalcandle._core import __version__
from metalcandle.model import Model, load_model

__all__ = ["Model", "load_model", "__version__"]
