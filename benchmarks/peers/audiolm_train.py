"""audiolm-pytorch's stage transformer, one training step: tokens/s. Run in the peers' venv.

  ~/.cache/musiclm_jax/peers-venv/bin/python benchmarks/peers/audiolm_train.py \
      [--dim 256 --depth 4 --heads 8 --batch 4 --length 1024 --vocab 1024 --repeats 5]

Model: `audiolm_pytorch.SemanticTransformer(dim, depth, heads, num_semantic_tokens=vocab)`,
unconditioned, with the library's defaults otherwise (T5-style relative position bias, 4
hyper-connection residual streams, value residuals, GEGLU feed-forward of inner width
int(dim * 8 / 3), no flash attention, dropout 0). The step is what SemanticTransformerWrapper's
`return_loss` path computes, without its data-side extras (EOS appended, 15% random attention
masking): logits of `length` positions (the start token and length - 1 ids), cross-entropy
against the `length` ids, backward, gradient-norm clipping at 1.0 and `torch.optim.AdamW`
(lr 1e-4, weight decay 0.01), in eager float32. tokens/s = batch x length / median step time
over `--repeats` steps after `--warmup` steps. Prints one JSON line.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402  pylint: disable=g-import-not-at-top


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--dim', type=int, default=256)
  parser.add_argument('--depth', type=int, default=4)
  parser.add_argument('--heads', type=int, default=8)
  parser.add_argument('--batch', type=int, default=4)
  parser.add_argument('--length', type=int, default=1024)
  parser.add_argument('--vocab', type=int, default=1024)
  parser.add_argument('--warmup', type=int, default=2)
  parser.add_argument('--repeats', type=int, default=5)
  parser.add_argument('--threads', type=int, default=os.cpu_count())
  args = parser.parse_args()
  torch = _common.set_threads(args.threads)
  import torch.nn.functional as F  # pylint: disable=g-import-not-at-top
  audiolm_pytorch = _common.import_audiolm()
  torch.manual_seed(0)
  model = audiolm_pytorch.SemanticTransformer(
      dim=args.dim, depth=args.depth, heads=args.heads, num_semantic_tokens=args.vocab)
  ids = torch.randint(0, args.vocab, (args.batch, args.length))

  def loss_fn():
    logits = model(ids=ids[:, :-1])  # [batch, length, vocab + 1]: start token + length - 1
    return F.cross_entropy(logits.transpose(1, 2), ids)

  seconds, times, loss = _common.time_train_step(torch, model, loss_fn, args.warmup,
                                                 args.repeats)
  _common.emit({
      'peer': 'audiolm-pytorch', 'what': 'SemanticTransformer train step (AdamW)',
      'params': sum(p.numel() for p in model.parameters()),
      'batch': args.batch, 'length': args.length, 'step_s': seconds, 'times_s': times,
      'tokens_per_s': args.batch * args.length / seconds, 'loss': loss,
      'threads': torch.get_num_threads(),
      'versions': _common.versions('torch', 'audiolm-pytorch')})


if __name__ == '__main__':
  main()
