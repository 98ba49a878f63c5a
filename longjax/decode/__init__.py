"""longjax.decode: generation with key/value caches, and decoding evaluation.

    from longjax import decode
    graphdef, params = nnx.split(model, nnx.Param)
    settings = decode.DecodeSettings.from_config(config.decode)
    out = decode.generate(graphdef, params, prompts, lengths, settings=settings)     # LM
    out = decode.generate_seq2seq(graphdef, params, inputs, segment_ids, settings=settings)
    metrics = decode.decode_and_score(data_config, settings, workdir, model, tokenizer,
                                      step=step)   # data_config: longjax.data.DataConfig

Modules: `sampling` (greedy / temperature / top-k / top-p), `search` (the
model-agnostic sampling loop and beam search), `generate` (the models'
prefill and cached steps, jitted), `evaluate` (decode the eval split, write
predictions, ROUGE and BLEU). The caches themselves are `longjax.models.cache`.
"""
from longjax.decode.evaluate import decode_and_score
from longjax.decode.evaluate import decode_rows
from longjax.decode.evaluate import format_samples
from longjax.decode.evaluate import sample_texts
from longjax.decode.evaluate import score_texts
from longjax.decode.generate import DecodeSettings
from longjax.decode.generate import Decoder
from longjax.decode.generate import generate
from longjax.decode.generate import generate_seq2seq
from longjax.decode.generate import Generation
from longjax.decode.generate import lm_decoder
from longjax.decode.generate import seq2seq_decoder
from longjax.decode.sampling import sample_logits
from longjax.decode.search import beam_search
from longjax.decode.search import length_penalty
from longjax.decode.search import sample_loop

__all__ = [
    'DecodeSettings', 'Decoder', 'Generation', 'beam_search', 'decode_and_score',
    'decode_rows', 'format_samples', 'generate', 'generate_seq2seq', 'length_penalty',
    'lm_decoder', 'sample_logits', 'sample_loop', 'sample_texts', 'score_texts',
    'seq2seq_decoder',
]
