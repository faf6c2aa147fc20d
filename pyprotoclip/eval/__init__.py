"""Evaluation: zero-shot, linear probe, retrieval; :func:`evaluate_model` is the one metrics function
that ``pyprotoclip eval`` and the validation during training share."""

from pyprotoclip.eval.metrics import evaluate_model
from pyprotoclip.eval.ood_metrics import ood_metrics

__all__ = ["evaluate_model", "ood_metrics"]
