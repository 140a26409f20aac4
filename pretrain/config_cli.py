"""Config files and `--config.key=value` overrides, with one-line errors for bad input.

`--config configs/clip.py:b16` imports the file and calls `get_config('b16')` (big_vision
convention). Overrides are parsed against the type of the field they replace, and the
config is locked afterwards so code cannot add keys by accident either.
"""

from __future__ import annotations

import argparse
import ast
import difflib
import importlib.util
import os

from ml_collections import ConfigDict


class ConfigError(ValueError):
    """A bad config path, variant or override; the message is one line for the user."""


def load_config_file(spec: str) -> ConfigDict:
    path, _, arg = spec.partition(':')
    if not os.path.isfile(path):
        here = os.path.dirname(path) or '.'
        choices = (
            sorted(f for f in os.listdir(here) if f.endswith('.py')) if os.path.isdir(here) else []
        )
        hint = f"; files in {here}: {', '.join(choices)}" if choices else ''
        raise ConfigError(f"config file '{path}' does not exist{hint}")
    module_spec = importlib.util.spec_from_file_location(
        f'_config_{os.path.basename(path)[:-3]}', path
    )
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    if not hasattr(module, 'get_config'):
        raise ConfigError(f"config file '{path}' has no get_config(arg) function")
    try:
        return module.get_config(arg or None)
    except ValueError as e:  # configs raise ValueError for an unknown variant
        raise ConfigError(f"{path}: {e}") from None


def flat_keys(config: ConfigDict, prefix: str = '') -> list[str]:
    keys = []
    for k, v in config.items():
        name = f'{prefix}{k}'
        keys.append(name)
        if isinstance(v, ConfigDict):
            keys.extend(flat_keys(v, name + '.'))
    return keys


def _parse_value(text: str, old):
    if isinstance(old, bool):
        if text.lower() in ('true', '1', 'yes'):
            return True
        if text.lower() in ('false', '0', 'no'):
            return False
        raise ValueError(f"expected a boolean, got '{text}'")
    if isinstance(old, int):
        return int(text)
    if isinstance(old, float):
        return float(text)
    if isinstance(old, str):
        return text
    try:  # tuples, lists, None and anything else Python can spell literally
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


# Sections of entries the user names: `--config.objectives.siglip.weight=0.5` adds an entry
# the config file does not have (SigLIP next to CLIP), and more keys of that new entry may
# follow. What it may hold is checked where it is built (pretrain/objectives/), so a
# misspelt option still stops the run with one line.
OPEN_SECTIONS = ('objectives',)


def add_open_entry(config: ConfigDict, key: str, text: str, added: set) -> bool:
    """Sets `section.name.option` of a new (or command-line-added) entry of an open section;
    False when `key` is not such a key. The value is a Python literal, else a string."""
    parts = key.split('.')
    if len(parts) != 3 or parts[0] not in OPEN_SECTIONS:
        return False
    section, name, option = parts
    if not isinstance(config.get(section), ConfigDict):
        return False
    entry = f'{section}.{name}'
    if name in config[section] and entry not in added:
        return False  # the config file's own entry: its keys are locked as usual
    with config.unlocked():
        if name not in config[section]:
            config[section][name] = ConfigDict()
            added.add(entry)
        config[section][name][option] = _parse_value(text, None)
    return True


def apply_override(config: ConfigDict, key: str, text: str, added: set | None = None):
    if add_open_entry(config, key, text, set() if added is None else added):
        return
    *parents, leaf = key.split('.')
    node = config
    for i, part in enumerate(parents + [leaf]):
        if not isinstance(node, ConfigDict) or part not in node:
            valid = flat_keys(config)
            close = difflib.get_close_matches(key, valid, n=3, cutoff=0.5)
            hint = (
                f"; did you mean {' or '.join(close)}?"
                if close
                else (
                    f"; valid keys here: {', '.join(sorted(node.keys()))}"
                    if isinstance(node, ConfigDict)
                    else ''
                )
            )
            raise ConfigError(f"unknown config key '{key}'{hint}")
        if i < len(parents):
            node = node[part]
    old = node[leaf]
    if isinstance(old, ConfigDict):
        raise ConfigError(
            f"config key '{key}' is a group; set one of its fields: "
            f"{', '.join(sorted(old.keys()))}"
        )
    try:
        value = _parse_value(text, old)
    except ValueError as e:
        raise ConfigError(f"config key '{key}': {e}") from None
    with config.unlocked():
        node[leaf] = value


def parse_overrides(argv: list[str]) -> tuple[list[tuple[str, str]], list[str]]:
    """Splits `--config.a.b=v` / `--config.a.b v` from the other arguments."""
    overrides, rest, i = [], [], 0
    while i < len(argv):
        arg = argv[i]
        if arg.startswith('--config.'):
            body = arg[len('--config.') :]
            if '=' in body:
                key, value = body.split('=', 1)
            elif i + 1 < len(argv):
                key, value = body, argv[i + 1]
                i += 1
            else:
                raise ConfigError(f"override '{arg}' has no value")
            overrides.append((key, value))
        else:
            rest.append(arg)
        i += 1
    return overrides, rest


def build_config(spec: str, overrides: list[tuple[str, str]]) -> ConfigDict:
    config = load_config_file(spec)
    config.lock()
    added = set()  # entries the command line added to OPEN_SECTIONS
    for key, value in overrides:
        apply_override(config, key, value, added)
    return config


def argument_parser(prog: str, description: str, *, config_help: str | None = None):
    """An ArgumentParser with the `--config path[:variant]` flag every entry point takes."""
    parser = argparse.ArgumentParser(
        prog=prog, description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        '--config',
        required=True,
        help=config_help or 'config file, optionally with :variant, e.g. configs/clip.py:b16',
    )
    return parser


def parse_args(parser, argv: list[str]):
    """(args, overrides): `--config.a.b=v` overrides split off, the rest parsed by `parser`."""
    overrides, rest = parse_overrides(argv)
    return parser.parse_args(rest), overrides
