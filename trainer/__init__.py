"""Accelerate-driven masked-language-model trainer for BERT-style models.

Where things are: config.py (typed recipe config and CLI overrides), data.py (loading, cleaning,
blocking, masking), model.py (model building, masked-rows-only MLM head), loop.py (the training
loop), metrics.py (perplexity, accuracy), evaluate.py (evaluation + CLI), checkpoint.py (save/resume),
tracking.py (W&B/TensorBoard/JSONL), console.py (progress and tables), fillmask.py (samples),
compare.py (offline run comparison), hub.py (offline fallbacks for the Makefile).
"""
