"""w2v-BERT semantic tokens: the conformer model, its losses and the k-means tokenizer."""
