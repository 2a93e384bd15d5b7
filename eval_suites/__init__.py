"""Evaluation suites: clean/OOD/adversarial accuracy, attack and suite registries, RobustBench interop, geometry
and shift analyses, three-axis reports (docs/evaluation.md "Evaluation suites")."""
import registry  # noqa: F401  (data flow: eval_suites -> registry -> grace_plugin)

from .attacks import create_attack, list_attacks, parse_eps, register_attack
from .report import aggregate_reports, build_report, harmonic_mean, write_report
from .context import SuiteContext
from .engine import evaluate, list_suites, parse_suite, register_suite, run_suites
from . import suites, vqa  # noqa: F401,E402  (register the suite bodies with the engine: classification, VQA)

__all__ = ["create_attack", "list_attacks", "parse_eps", "register_attack", "build_report", "harmonic_mean",
           "write_report", "aggregate_reports", "SuiteContext", "list_suites", "parse_suite", "register_suite",
           "run_suites", "evaluate"]
