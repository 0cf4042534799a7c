"""Reward modelling: MORE, MultiTask, Uniform and single-source RMs on TRL (see trainer.py, more.py)."""
