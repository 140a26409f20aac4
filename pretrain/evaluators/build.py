"""config.evals -> evaluators, and running them into one metrics row.

    evaluators = build_evaluators(config)           # once: cheap, data loads at first run
    row = run_evaluators(evaluators, model)         # {'eval/zeroshot/top1': 0.27, ...}

Each `config.evals.<name>` section names its `kind`; `image_size`, `context_length` and
`max_objects` left at None take the training values (config.input), so a run overridden to
another resolution or context evaluates at that one too.
"""

from __future__ import annotations

import time

from ml_collections import ConfigDict

from pretrain.evaluators.dense_zeroshot import DenseZeroShot
from pretrain.evaluators.linear_probe import LinearProbe
from pretrain.evaluators.retrieval import Retrieval
from pretrain.evaluators.zeroshot import ZeroShot

KINDS = {
    'zeroshot': ZeroShot,
    'retrieval': Retrieval,
    'linear_probe': LinearProbe,
    'dense_zeroshot': DenseZeroShot,
}
INHERITED = ('image_size', 'context_length', 'max_objects')  # None -> config.input's value


def resolve_section(section, config) -> ConfigDict:
    section = ConfigDict(section.to_dict() if isinstance(section, ConfigDict) else dict(section))
    for key in INHERITED:
        if key in section and section[key] is None:
            section[key] = config.input[key]
    return section


def build_evaluators(config, names=None) -> list:
    """One evaluator per `config.evals` entry (only `names`, if given), in name order."""
    evals = config.get('evals') or {}
    if names is not None:
        unknown = sorted(set(names) - set(evals))
        if unknown:
            raise ValueError(
                f"unknown evaluator(s) {', '.join(unknown)}; configured: "
                f"{', '.join(evals) or 'none'}"
            )
    out = []
    for name, section in evals.items():
        if names is not None and name not in names:
            continue
        kind = section.get('kind')
        if kind not in KINDS:
            raise ValueError(
                f"evals.{name}.kind: unknown evaluator kind '{kind}'; valid: " f"{', '.join(KINDS)}"
            )
        out.append(KINDS[kind](resolve_section(section, config), name=name))
    return out


def run_evaluators(evaluators, model) -> dict:
    """{'eval/<name>/<metric>': value} over all evaluators, plus 'eval/<name>/seconds'."""
    row = {}
    for evaluator in evaluators:
        start = time.perf_counter()
        for metric, value in evaluator.run(model):
            row[f'eval/{metric}'] = float(value)
        row[f'eval/{evaluator.name}/seconds'] = time.perf_counter() - start
    return row
