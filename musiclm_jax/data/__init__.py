"""Datasets, SeqIO input pipelines and token caches."""
