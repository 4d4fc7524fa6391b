"""Tiny random models for the tests and benchmarks: real transformers encoders, LLMs and tokenizers built from small
configs and saved like real checkpoints, so nothing is downloaded."""
