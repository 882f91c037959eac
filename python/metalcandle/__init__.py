"""metalcandle: train and fine-tune small decoder-only transformers on a Rust core."""

from metalcandle import devices, distributed
from metalcandle._core import __version__
from metalcandle.chat import InteractivePrompt
from metalcandle.fit import train_epoch, train_model
from metalcandle.generate import generate_text, stream_text
from metalcandle.model import Model, load_model
from metalcandle.optim import SGD, AdamW, Lion, Optimizer
from metalcandle.quantize import (
    QuantizationPlan,
    dequantize_model,
    disable_qat,
    enable_qat,
    is_model_quantized,
    prepare_model_for_quantization,
    quantize_model,
)
from metalcandle.sampling import next_token_probs
from metalcandle.text_dataset import TextDataset
from metalcandle.tokenizers import CharTokenizer, Tokenizer, load_tokenizer, train_bpe
from metalcandle.trainable_tokenizers import BasicTokenizer, BPETokenizer
from metalcandle.trainer import StepStats, Trainer

devices.pin_default_threads()

__all__ = ["SGD", "AdamW", "Lion", "Optimizer", "Model", "StepStats", "Trainer", "load_model", "__version__"]
__all__ += [
    "BasicTokenizer",
    "BPETokenizer",
    "TextDataset",
    "train_epoch",
    "train_model",
    "CharTokenizer",
    "InteractivePrompt",
    "Tokenizer",
    "generate_text",
    "load_tokenizer",
    "next_token_probs",
    "QuantizationPlan",
    "dequantize_model",
    "disable_qat",
    "enable_qat",
    "is_model_quantized",
    "prepare_model_for_quantization",
    "quantize_model",
    "stream_text",
    "train_bpe",
    "distributed",
]
