"""Data: corpora (documents of sentences), tokenizers, and the grain pipeline that makes batches."""
