"""Melody conditioning: a ViT melody embedder (192-d per 4 s), its triplet training and RVQ tokens.

  encoder.py       MelodyEncoder: log-mel frames -> transformer -> unit vectors; embed_windows
  losses.py        semi-hard (FaceNet) and batch-all triplet losses over the global batch
  data.py          SeqIO preprocessors: same-melody pairs of renderings, crops aligned on the notes
  model.py         MelodyModel for the common trainer
  conditioning.py  the melody-token RVQ, MelodyConditioner, the MuLan + melody prefix layout
  metrics.py       melody adherence (chroma / pitch + DTW) and same-melody retrieval (+ CLI)
"""
