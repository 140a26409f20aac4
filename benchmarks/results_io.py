"""Writing a benchmark's result: one JSON file, its folder created if needed."""

from __future__ import annotations

import json
import os


def write_json(path: str, result: dict) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, 'w') as f:
        json.dump(result, f, indent=2)
