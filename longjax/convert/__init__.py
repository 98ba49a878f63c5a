"""Checkpoint conversion: Hugging Face folders into longjax runs and back.

`python -m longjax.convert` (see __main__.py); the pieces: `hf_files` (config.json
and safetensors, read one tensor at a time), `architectures` (each HF
architecture's tensors onto longjax's parameters), `checkpoints` (import, export,
run workdirs).
"""
