"""Checkpoint conversion: Hugging Face folders into longjax runs and back.

`python -m longjax.convert` (see __main__.py); the pieces: `hf_files` (config.json
and safetensors, read one tensor at a time), `architectures` (Llama, Mistral,
Qwen2: each architecture's tensors onto longjax's parameters), `t5` (T5, LongT5),
`checkpoints` (import, export, run workdirs).
"""
