"""EnCodec 24 kHz encode / decode of one clip: seconds and real-time factor. Peers' venv.

  ~/.cache/musiclm_jax/peers-venv/bin/python benchmarks/peers/encodec_codec.py \
      [--seconds 10 --bandwidth 6 --repeats 3]

`encodec.EncodecModel.encodec_model_24khz(pretrained=False)` (the 24 kHz architecture with
random weights: speed does not depend on them), `set_target_bandwidth(6.0)` (8 RVQ codebooks
of 1024 at 75 Hz), batch 1, eager float32 under `torch.inference_mode()`. encode = waveform ->
codes (`model.encode`), decode = codes -> waveform (`model.decode`). Times: median of
`--repeats` calls after one warm-up call; x real time = clip seconds / time. Prints one JSON
line.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402  pylint: disable=g-import-not-at-top


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--seconds', type=float, default=10.0)
  parser.add_argument('--bandwidth', type=float, default=6.0)
  parser.add_argument('--warmup', type=int, default=1)
  parser.add_argument('--repeats', type=int, default=3)
  parser.add_argument('--threads', type=int, default=os.cpu_count())
  args = parser.parse_args()
  torch = _common.set_threads(args.threads)
  from encodec import EncodecModel  # pylint: disable=g-import-not-at-top
  torch.manual_seed(0)
  model = EncodecModel.encodec_model_24khz(pretrained=False)
  model.set_target_bandwidth(args.bandwidth)
  model.eval()
  samples = int(args.seconds * model.sample_rate)
  audio = torch.randn(1, model.channels, samples) * 0.1
  with torch.inference_mode():
    frames = model.encode(audio)
    enc_s, enc_times = _common.time_median(lambda: model.encode(audio), args.warmup,
                                           args.repeats)
    dec_s, dec_times = _common.time_median(lambda: model.decode(frames), args.warmup,
                                           args.repeats)
  codes = frames[0][0]
  _common.emit({
      'peer': 'encodec', 'what': 'EncodecModel.encodec_model_24khz(pretrained=False)',
      'params': sum(p.numel() for p in model.parameters()),
      'seconds': args.seconds, 'bandwidth_kbps': args.bandwidth,
      'codebooks': int(codes.shape[1]), 'frames': int(codes.shape[-1]),
      'encode_s': enc_s, 'decode_s': dec_s, 'encode_times_s': enc_times,
      'decode_times_s': dec_times, 'encode_x_realtime': args.seconds / enc_s,
      'decode_x_realtime': args.seconds / dec_s, 'threads': torch.get_num_threads(),
      'versions': _common.versions('torch', 'encodec')})


if __name__ == '__main__':
  main()
