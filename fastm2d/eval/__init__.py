"""Evaluation built in: the paper's linear-evaluation protocol, fine-tuning, and monitors during pre-training."""
from .linear import linear_eval, train_linear_probe
from .scores import accuracy, confidence_interval, mean_average_precision
from .tasks import EvalTask, load_tasks

__all__ = ["linear_eval", "train_linear_probe", "accuracy", "confidence_interval", "mean_average_precision",
           "EvalTask", "load_tasks"]
