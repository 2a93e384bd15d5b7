"""The application on top of the grace-plugin library: the ``grace`` command line (``cli``), the embedded testbed
(``testbed``: the synthetic world, the tiny CLIP's pretraining, the testbed's configs) and the experiments run on it
(``studies``: quick start, named studies, the tuning protocol, verdicts, results pages).

It imports the library (``grace_plugin``, ``registry``, ``eval_suites``) and is never imported by it
(``tests/test_layering.py``), as ``open_clip_train`` sits on ``open_clip``."""
