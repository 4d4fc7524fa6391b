"""The library behind the `train.py` and `eval.py` commands: data, model building, the Trainer, evaluation."""
