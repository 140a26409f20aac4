"""config.evals -> evaluators, and running them into one metrics row.

    evaluators = build_evaluators(config)           # once: cheap, data loads at first run
    row = run_evaluators(evaluators, model)         # {'eval/zeroshot/top1': 0.27, ...}

Each `config.evals.<name>` section names its `kind`; `image_size`, `context_length` and
`max_objects` left at None take the training values (config.input), so a run overridden to
another resolution or context evaluates at that one too.

And its `source`: 'shapes' (the held-out split, the default) or real data, per kind:
    zeroshot        folder | tfds
    linear_probe    folder | tfds (train split: train + val; test split: test)
    retrieval       coco | flickr
    dense_zeroshot  ade20k | voc
configs/common.py has a helper per real source (folder_zeroshot_eval, coco_retrieval_eval,
ade20k_eval, ...) and configs/eval_real.py puts them on any training config. A real source
is opened here, so a missing root, an empty folder or an unknown source fails at build time
in one line naming the section; its images are read at the first run.
"""

from __future__ import annotations

import time

from ml_collections import ConfigDict

from pretrain.evaluators import common
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
# Prompts and captions must be tokenized as the model was trained: always the input's.
TOKENIZER_KEYS = ('tokenizer', 'tokenizer_path')


def resolve_section(section, config) -> ConfigDict:
    section = ConfigDict(section.to_dict() if isinstance(section, ConfigDict) else dict(section))
    for key in INHERITED:
        if key in section and section[key] is None:
            section[key] = config.input[key]
    for key in TOKENIZER_KEYS:
        if key not in section and key in config.input:
            section[key] = config.input[key]
    return section


def check_source(kind: str, section, name: str) -> None:
    """A known source for this kind, and, for real data, one that opens and is not empty."""
    source = section.get('source', 'shapes')
    valid = ('shapes', *common.REAL_SOURCES.get(kind, ()))
    if source not in valid:
        raise ValueError(
            f"evals.{name}.source: unknown source '{source}' for a {kind} evaluator; valid: "
            f"{', '.join(valid)}"
        )
    if source != 'shapes':
        try:
            source = common.open_source(section)
            if kind == 'linear_probe':
                test = common.open_source(common.test_split_section(section))
                common.check_probe(section, source, test)
        except ValueError as e:
            raise ValueError(f'evals.{name}: {e}') from None


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
        section = resolve_section(section, config)
        check_source(kind, section, name)
        out.append(KINDS[kind](section, name=name))
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
