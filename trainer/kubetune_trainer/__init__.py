"""kubetune's trainer: what a fine-tuning run is, and running one.

Importing this package must stay cheap and torch-free: the operator imports `kubetune_trainer.config`.
"""
