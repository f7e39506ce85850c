"""Evaluation: metrics (:mod:`training.evaluation.metrics`) and the harness that runs a model
on a ranking task (:mod:`training.evaluation.harness`)."""
