"""Fine-tuning: training data, losses, embedder and reranker trainers, mining, teacher scores.

Training runs on transformers' ``Trainer`` (bf16/fp16, gradient checkpointing, DeepSpeed,
checkpoints and resume come from there) and the same command runs in one process or under
``torchrun`` (``python -m bgekit.train ...``).
"""
