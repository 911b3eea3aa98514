"""MusicLM's three stage LMs: one decoder-only LM configured by a stage spec.

spec.py    the token layout (streams, id offsets, NULL ids, flattening; the sampler's contract)
model.py   StageModel: the LM on that layout (masked loss, conditioning dropout, per-level metrics)
tokens.py  the frozen tokenizers of the stage-token cache (semantic, SoundStream, MuLan)
data.py    SeqIO tasks: one token cache per corpus, read by every stage with its own crop
"""
