"""Commented example configs printed by `metalcandle init` (every key, with its default)."""

from __future__ import annotations

_COMMON_TAIL = """\
[optimizer]
name = "adamw"                  # "adamw" | "sgd" (momentum, nesterov) | "lion"
lr = {lr}                      # peak learning rate
betas = [0.9, 0.999]
eps = 1e-8
weight_decay = {wd}

[scheduler]
name = "cosine"                 # "constant" | "linear" | "cosine"
warmup_steps = {warmup}              # linear warmup from 0 to lr
min_lr_ratio = 0.1              # linear/cosine decay ends at lr * min_lr_ratio

[train]
max_steps = {steps}                # or: epochs = 1.5 (not both)
batch_size = {batch}                # sequences per micro-batch
grad_accum = 1                  # micro-batches per optimizer step
max_grad_norm = 1.0             # clip the total gradient norm; 0 disables
eval_every = {eval_every}               # validation loss + perplexity + a few samples
eval_batches = 8
save_every = {eval_every}               # checkpoint into OUTPUT_DIR/checkpoints/step-N
keep_last = 2                   # older step checkpoints are deleted
early_stopping_patience = 0     # stop after this many evaluations without improvement (0: off);
                                # the best checkpoint is kept in OUTPUT_DIR/best
log_every = 10                  # a line in OUTPUT_DIR/metrics.jsonl every N steps
resume = "auto"                 # "auto" (newest checkpoint in OUTPUT_DIR), a checkpoint path, or false

[generate]                      # samples at evaluation, `metalcandle generate` and `metalcandle chat`
max_new_tokens = {max_new}
temperature = 0.8               # 0: greedy
top_k = 0                       # 0: off
top_p = 0.95
repetition_penalty = 1.0
num_beams = 1
seed = 0

[hardware]                      # where and how the run computes: left out of the config's hash,
                                # so a run resumes (and MPI ranks agree) whatever these say
device = "auto"                 # "auto" | "cpu" | "cuda" | "metal" (also read as run.device)
dtype = "float32"               # "float32" | "bfloat16" | "float16" (half precision: for a GPU, and
                                # not with [lora]); a resume must keep the checkpoint's
threads = 0                     # CPU threads; 0: $RAYON_NUM_THREADS, else every core
gradient_checkpointing = false  # keep only each block's input, recompute it in the backward
                                # (also read as train.gradient_checkpointing)
fused = true                    # the fused CPU step for float32 full training; false: per-op path

# [quantization]                # quantization-aware training for a quantized deployment:
# qat = "q4_0"                  # each step trains through the rounding `metalcandle quantize`
# skip = []                     # applies (then its default format); globs kept float, e.g. "lm_head"
"""

FROM_SCRATCH = """\
# metalcandle config: train a small character-level model from scratch.
# Run:  metalcandle train this.toml   (override any key: --set train.max_steps=50)
# Input paths (data, model) are relative to this file; output_dir and models_dir to the
# directory you run from.

[run]
name = "my-char-model"          # also the registry name of the finished model
output_dir = "runs/my-char-model"   # checkpoints, metrics.jsonl, loss.png
seed = 0
# models_dir = "models"         # registry folder (default: $METALCANDLE_MODELS_DIR or ./models)

[model.spec]                    # a new decoder-only transformer
architecture = "custom-transformer"
d_model = 128
n_layers = 4
n_heads = 4
n_kv_heads = 4                  # < n_heads: grouped-query attention
d_ff = 352
max_seq_len = 128
norm = "rmsnorm"                # "layernorm" | "rmsnorm"
mlp = "swiglu"                  # "gelu" | "gelu_tanh" | "swiglu" | "relu"
positions = "rope"              # "learned" | "sinusoidal" | "rope"
tie_embeddings = true
dropout = 0.0

[tokenizer]
kind = "char"                   # "char": printable ASCII + newline + tab (others -> <unk>, reported)
                                # "bpe": byte-level BPE trained on data.train, with vocab_size below
charset = "ascii"
# vocab_size = 1024             # bpe only

[data]
train = ["data/corpus.txt"]     # .txt files, or .jsonl with {"text"}, {"prompt","completion"}, {"messages"}
# valid = ["data/valid.txt"]    # or hold out a fraction of the training windows:
valid_fraction = 0.1
format = "auto"                 # "auto" | "text" | "completions" | "chat"
seq_len = 128                   # tokens per training window
packing = true                  # concatenate documents and cut windows (false: one document per row)
mask_prompt = true              # completions/chat: no loss on prompt tokens

""" + _COMMON_TAIL.format(lr="3e-3", wd="0.01", warmup=20, steps=1000, batch=16, eval_every=100, max_new=200)

LORA = """\
# metalcandle config: LoRA fine-tune of a pretrained model.
# First import the model into the registry (a local Hugging Face folder, or a hub id when online):
#   metalcandle import-model path/to/Qwen2.5-0.5B-Instruct --name qwen2.5-0.5b-instruct
# Then:  metalcandle train this.toml
# Input paths (data, model) are relative to this file; output_dir and models_dir to the
# directory you run from.

[run]
name = "my-qwen-lora"
output_dir = "runs/my-qwen-lora"
seed = 0

[model]
name = "qwen2.5-0.5b-instruct"  # a registry name (metalcandle models); or instead:
# path = "path/to/hf_folder"     # a Hugging Face folder (config.json + safetensors + tokenizer.json)

[tokenizer]
kind = "pretrained"             # the model's own tokenizer.json and chat template

[data]
train = ["data/train.jsonl"]    # {"messages": [...]} rendered with the chat template,
                                # {"prompt", "completion"}, or {"text"}
valid_fraction = 0.1
format = "auto"
seq_len = 512
packing = false                 # one conversation per row (padded)
mask_prompt = true              # learn only the assistant / completion tokens

[lora]                          # remove this section for full fine-tuning
r = 8
alpha = 16
dropout = 0.0
target_modules = ["q_proj", "v_proj"]   # or "all-linear"
use_rslora = false

""" + _COMMON_TAIL.format(lr="2e-4", wd="0.0", warmup=10, steps=200, batch=4, eval_every=50, max_new=128)


def from_preset(name: str) -> str:
    """The from-scratch example with [model.spec] set to preset `name` (its keys spelled out, commented,
    to override), and for the GPT-2 presets a BPE tokenizer of GPT-2's size and its 1024-token context."""
    from metalcandle.presets import is_gpt2, preset_spec

    spec = preset_spec(name)
    head, rest = FROM_SCRATCH.split("[model.spec]", 1)
    rest = rest[rest.index("[tokenizer]") :]
    lines = [f'[model.spec]\npreset = "{name}"              # keys below override the preset\n']
    for key, value in spec.items():
        shown = ("true" if value else "false") if isinstance(value, bool) else repr(value).replace("'", '"')
        lines.append(f"# {key} = {shown}\n")
    head = head.replace(
        "train a small character-level model from scratch", f"train a {name} model from scratch"
    )
    text = head + "".join(lines) + "dropout = 0.0\n\n" + rest
    if is_gpt2(name):
        text = text.replace('kind = "char" ', 'kind = "bpe"  ').replace(
            "# vocab_size = 1024             # bpe only", f"vocab_size = {spec['vocab_size']}"
        )
        text = text.replace(
            "seq_len = 128                   #", f"seq_len = {spec['max_seq_len']}                  #"
        )
        text = text.replace("batch_size = 16 ", "batch_size = 8  ").replace("lr = 3e-3 ", "lr = 6e-4 ")
    return text
