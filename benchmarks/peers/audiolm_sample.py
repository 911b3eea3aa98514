"""audiolm-pytorch's KV-cache sampling, batch 1: tokens/s. Run in the peers' venv.

  ~/.cache/musiclm_jax/peers-venv/bin/python benchmarks/peers/audiolm_sample.py \
      [--dim 256 --depth 4 --heads 8 --vocab 1024 --prompt 16 --length 500 --repeats 3]

`SemanticTransformerWrapper(transformer=SemanticTransformer(...), unique_consecutive=False)
.generate(prime_ids=prompt, max_length=prompt + length, use_kv_cache=True, temperature=1,
filter_thres=...)`, the library's cached generation (each step feeds the new token through the
layers against the cached keys and values; the library rebuilds the relative position bias
for all positions every step). filter_thres is set so its top-k keeps `--top-k` (50) logits,
as our benchmark's top-k 50 at temperature 1. The random weights' EOS logit is pushed to
-1e4 so that no run stops early: every call decodes exactly `length` tokens (checked).
Times: median of `--repeats` calls after one warm-up call; tokens/s = length / time.
Prints one JSON line.
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
  parser.add_argument('--vocab', type=int, default=1024)
  parser.add_argument('--prompt', type=int, default=16)
  parser.add_argument('--length', type=int, default=500)
  parser.add_argument('--top-k', type=int, default=50)
  parser.add_argument('--warmup', type=int, default=1)
  parser.add_argument('--repeats', type=int, default=3)
  parser.add_argument('--threads', type=int, default=os.cpu_count())
  args = parser.parse_args()
  torch = _common.set_threads(args.threads)
  audiolm_pytorch = _common.import_audiolm()
  from audiolm_pytorch import audiolm_pytorch as core  # pylint: disable=g-import-not-at-top
  core.tqdm = lambda iterable, **unused: iterable  # no progress bar in the timed loop
  torch.manual_seed(0)
  model = audiolm_pytorch.SemanticTransformer(
      dim=args.dim, depth=args.depth, heads=args.heads, num_semantic_tokens=args.vocab)
  with torch.no_grad():
    model.to_logits.bias[model.eos_id] = -1e4
  wrapper = audiolm_pytorch.SemanticTransformerWrapper(transformer=model,
                                                       unique_consecutive=False)
  wrapper.eval()
  num_logits = args.vocab + 1
  filter_thres = 1.0 - (args.top_k + 0.5) / num_logits  # int((1 - thres) * n) == top_k
  assert max(int((1 - filter_thres) * num_logits), 1) == args.top_k
  prompt = torch.randint(0, args.vocab, (1, args.prompt))
  lengths = []

  def run():
    out = wrapper.generate(prime_ids=prompt, max_length=args.prompt + args.length,
                           batch_size=1, temperature=1.0, filter_thres=filter_thres,
                           use_kv_cache=True)
    lengths.append(out.shape[-1] - args.prompt)

  seconds, times = _common.time_median(run, args.warmup, args.repeats)
  assert all(n == args.length for n in lengths), lengths
  _common.emit({
      'peer': 'audiolm-pytorch', 'what': 'SemanticTransformerWrapper.generate, use_kv_cache',
      'params': sum(p.numel() for p in model.parameters()),
      'prompt': args.prompt, 'length': args.length, 'top_k': args.top_k, 'seconds': seconds,
      'times_s': times, 'tokens_per_s': args.length / seconds,
      'threads': torch.get_num_threads(),
      'versions': _common.versions('torch', 'audiolm-pytorch')})


if __name__ == '__main__':
  main()
