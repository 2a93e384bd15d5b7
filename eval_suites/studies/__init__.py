"""Experiments on the embedded testbed, on top of the evaluation engine: the quickstart (``quickstart``), named
studies with seeds and verdicts (``runner``), the tuning protocol (``tuning``), the verdict rules (``verdicts``) and
the testbed's settings (``testbed_config``, read from ``configs/testbed/``)."""
