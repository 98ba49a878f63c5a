"""longjax models for the shared peer benchmark (`shared/bench/peers.py`).

Registers, through the harness's `register_model` hook, stacks built from the
same shared config as its peers (hidden, heads, layers, mlp, vocab), returning
final hidden states like them (no LM head):

  longjax-local           bidirectional local attention, radius 127 (= LongT5-local)
  longjax-tglobal         bidirectional transient-global, radius 127, block 16 (= LongT5-TGlobal)
  longjax-local-causal    the causal LM stack, radius 127
  longjax-full            bidirectional full attention (our kernel)
  longjax-hierarchical    bidirectional hierarchical, block 64

Run, in a virtualenv that has transformers==4.57.6 (the last release with
Flax models) and longjax installed (`pip install -e .`):

    python shared/bench/peers.py --plugin benchmarks/peers_plugin.py \
        --models longt5-local,bigbird,longjax-local --lengths 1024,8192 --mode fwdbwd
"""
import peers  # the harness module (the --plugin loader makes it importable)


def _builder(kind: str, causal: bool, **attention):
  def build(cfg):
    import jax.numpy as jnp
    from flax import nnx
    from longjax import models

    config = models.ModelConfig.from_config(dict(
        arch='lm', num_layers=cfg['layers'], emb_dim=cfg['hidden'], num_heads=cfg['heads'],
        mlp_dim=cfg['mlp'], vocab_size=cfg['vocab_size'], max_len=max(cfg['seq_len'], 1024),
        dtype=cfg['dtype_name'], param_dtype='float32', positions='rope',
        remat=cfg.get('longjax_remat', 'none'),
        # LongT5's default feed-forward (T5 v1.0): relu, two matrices; BigBird: gelu.
        mlp_activation=cfg.get('longjax_mlp', 'relu'),
        attention=dict(kind=kind, **attention)))

    class Stack(nnx.Module):
      """Embedding + blocks + final norm: what the peers' encoders compute."""

      def __init__(self, rngs):
        self.embedder = models.Embedder(config, rngs)
        self.stack = models.Stack(config, config.layer_kinds(), causal=causal, cross=False,
                                  rngs=rngs)

      def __call__(self, ids):
        positions = jnp.broadcast_to(jnp.arange(ids.shape[1]), ids.shape)
        x = self.embedder.embed(ids, positions, None)
        return self.stack(x, positions, None, None)[0]

    graphdef = nnx.graphdef(nnx.eval_shape(lambda: Stack(nnx.Rngs(0))))

    def init_fn(rng):
      return nnx.state(Stack(nnx.Rngs(params=rng)), nnx.Param)

    def apply_fn(params, ids):
      return nnx.merge(graphdef, params)(ids)

    return init_fn, apply_fn

  return build


peers.register_model('longjax-local')(_builder('local', False, radius=127))
peers.register_model('longjax-tglobal')(_builder('transient_global', False, radius=127,
                                                 summary_block=16))
peers.register_model('longjax-local-causal')(_builder('local', True, radius=127))
peers.register_model('longjax-full')(_builder('full', False))
peers.register_model('longjax-hierarchical')(_builder('hierarchical', False, level0_block=64))
