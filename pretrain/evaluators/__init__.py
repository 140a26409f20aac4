"""Evaluators: small objects built from their config section; `run(model)` yields
`(name, value)` pairs such as ('zeroshot/top1', 0.27). See build.py for the config side."""

from pretrain.evaluators.build import KINDS, build_evaluators, run_evaluators

__all__ = ['KINDS', 'build_evaluators', 'run_evaluators']
