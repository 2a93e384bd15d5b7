"""Evaluation suites: clean/OOD/adversarial accuracy, attack registry, three-axis reports."""
import registry  # noqa: F401  (data flow: eval_suites -> registry -> grace_plugin)

from .attacks import create_attack, list_attacks, parse_eps, register_attack
from .report import build_report, harmonic_mean, write_report

__all__ = ["create_attack", "list_attacks", "parse_eps", "register_attack", "build_report", "harmonic_mean",
           "write_report"]
