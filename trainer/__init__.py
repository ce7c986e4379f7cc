"""Accelerate-driven masked-language-model trainer for BERT-style models.

Where things are: config.py (typed recipe config, CLI overrides), data.py (loading, cleaning, blocking,
masking), model.py (model building, masked-rows-only MLM head), step.py (one optimizer step, optimizer,
schedule, non-finite guard), loop.py (the Trainer: setup / fit / finish), metrics.py (perplexity,
interval meter, MFU), tracking.py (metrics sinks: JSONL, W&B, TensorBoard, trackio), console.py
(progress and tables), checkpoint.py (save/resume), rundir.py (run directory layout, resume lookup),
runtime.py (device, precision, signals), export.py (the saved model), evaluate.py, fillmask.py,
compare.py (commands), hub.py (offline fallbacks for the Makefile).
"""
