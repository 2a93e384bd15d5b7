"""Experiments on the embedded testbed, run on the evaluation engine: the quick start (``quickstart``), named studies
with seeds and verdicts (``runner``), the tuning protocol (``tuning``, ``search``), the verdict rules
(``verdicts``), the shift table (``shift_table``) and the results pages (``publish``)."""
