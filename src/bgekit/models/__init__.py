"""Embedders and rerankers: prompts, tokenization, pooling and scoring."""
