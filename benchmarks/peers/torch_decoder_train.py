"""A minimal eager PyTorch decoder, one training step: tokens/s. Run in the peers' venv.

  ~/.cache/musiclm_jax/peers-venv/bin/python benchmarks/peers/torch_decoder_train.py \
      [--dim 256 --depth 4 --heads 8 --mlp 1024 --batch 4 --length 1024 --vocab 1024]
      [--relative-bias] [--repeats 5]

The shape of our anchor decoder (benchmarks/stage_training.py) written the plain PyTorch way:
token embedding, `depth` pre-LayerNorm layers (bias-free q/k/v/out projections,
`torch.nn.functional.scaled_dot_product_attention`, a GELU MLP of width `mlp`), a final
LayerNorm and an untied read-out. Without --relative-bias attention is `is_causal=True` (no
position information at all: the fastest a PyTorch decoder of this shape gets on a CPU, the
fused flash-attention kernel). With --relative-bias a learned T5 relative position bias
([heads, 32 buckets], max distance 128, computed once per step and shared by the layers, as
ours) is added to the causal logits through `attn_mask`, as a T5-style PyTorch model must.
The step: cross-entropy over the `length` positions, backward, gradient-norm clipping at 1.0,
`torch.optim.AdamW` (lr 1e-4, weight decay 0.01), eager float32. tokens/s = batch x length /
median step time over `--repeats` steps after `--warmup`. Prints one JSON line.
"""
import argparse
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402  pylint: disable=g-import-not-at-top


def relative_buckets(length: int, num_buckets: int = 32, max_distance: int = 128):
  """[length, length] causal T5 bucket ids (keys after the query: bucket 0, masked anyway)."""
  import torch  # pylint: disable=g-import-not-at-top
  position = torch.arange(length)
  n = (position[:, None] - position[None, :]).clamp(min=0)
  max_exact = num_buckets // 2
  large = max_exact + (torch.log(n.float() / max_exact + 1e-12) / math.log(max_distance / max_exact)
                       * (num_buckets - max_exact)).long()
  large = large.clamp(max=num_buckets - 1)
  return torch.where(n < max_exact, n, large)


def build(torch, args):
  nn = torch.nn
  F = torch.nn.functional

  class Layer(nn.Module):

    def __init__(self):
      super().__init__()
      self.norm1 = nn.LayerNorm(args.dim)
      self.qkv = nn.Linear(args.dim, 3 * args.dim, bias=False)
      self.out = nn.Linear(args.dim, args.dim, bias=False)
      self.norm2 = nn.LayerNorm(args.dim)
      self.wi = nn.Linear(args.dim, args.mlp, bias=False)
      self.wo = nn.Linear(args.mlp, args.dim, bias=False)

    def forward(self, x, bias):
      b, n, _ = x.shape
      q, k, v = self.qkv(self.norm1(x)).view(b, n, 3, args.heads, -1).permute(2, 0, 3, 1, 4)
      if bias is None:
        h = F.scaled_dot_product_attention(q, k, v, is_causal=True)
      else:
        h = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
      x = x + self.out(h.transpose(1, 2).reshape(b, n, -1))
      return x + self.wo(F.gelu(self.wi(self.norm2(x))))

  class Decoder(nn.Module):

    def __init__(self):
      super().__init__()
      self.embed = nn.Embedding(args.vocab, args.dim)
      self.layers = nn.ModuleList([Layer() for _ in range(args.depth)])
      self.norm = nn.LayerNorm(args.dim)
      self.logits = nn.Linear(args.dim, args.vocab, bias=False)
      self.rel = nn.Parameter(torch.zeros(args.heads, 32)) if args.relative_bias else None
      if args.relative_bias:
        buckets = relative_buckets(args.length)
        self.register_buffer('buckets', buckets, persistent=False)
        causal = torch.ones(args.length, args.length, dtype=torch.bool).tril()
        self.register_buffer('future', torch.zeros(args.length, args.length).masked_fill(
            ~causal, float('-inf')), persistent=False)

    def forward(self, ids):
      bias = None
      if self.rel is not None:
        bias = (self.rel[:, self.buckets] + self.future)[None]  # [1, heads, length, length]
      x = self.embed(ids)
      for layer in self.layers:
        x = layer(x, bias)
      return self.logits(self.norm(x))

  return Decoder()


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--dim', type=int, default=256)
  parser.add_argument('--depth', type=int, default=4)
  parser.add_argument('--heads', type=int, default=8)
  parser.add_argument('--mlp', type=int, default=1024)
  parser.add_argument('--batch', type=int, default=4)
  parser.add_argument('--length', type=int, default=1024)
  parser.add_argument('--vocab', type=int, default=1024)
  parser.add_argument('--relative-bias', action='store_true')
  parser.add_argument('--warmup', type=int, default=2)
  parser.add_argument('--repeats', type=int, default=5)
  parser.add_argument('--threads', type=int, default=os.cpu_count())
  args = parser.parse_args()
  torch = _common.set_threads(args.threads)
  F = torch.nn.functional
  torch.manual_seed(0)
  model = build(torch, args)
  targets = torch.randint(1, args.vocab, (args.batch, args.length))
  inputs = torch.nn.functional.pad(targets[:, :-1], (1, 0))

  def loss_fn():
    return F.cross_entropy(model(inputs).reshape(-1, args.vocab), targets.reshape(-1))

  seconds, times, loss = _common.time_train_step(torch, model, loss_fn, args.warmup,
                                                 args.repeats)
  _common.emit({
      'peer': 'minimal PyTorch decoder' + (' + T5 relative bias' if args.relative_bias else ''),
      'what': 'decoder train step (AdamW)',
      'params': sum(p.numel() for p in model.parameters()),
      'batch': args.batch, 'length': args.length, 'step_s': seconds, 'times_s': times,
      'tokens_per_s': args.batch * args.length / seconds, 'loss': loss,
      'threads': torch.get_num_threads(), 'versions': _common.versions('torch')})


if __name__ == '__main__':
  main()
