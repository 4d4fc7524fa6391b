"""Data loading and the encoder feature cache behind `train.py`."""
