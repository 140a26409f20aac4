"""Prints the `--config.model.*` overrides that build the model of some public weights.

    python -m pretrain.weights hf_clip /path/to/clip-vit-base-patch16
    python -m pretrain.main --config configs/clip.py --workdir DIR \\
        $(python -m pretrain.weights hf_clip /path/to/clip-vit-base-patch16) \\
        --config.init.format=hf_clip --config.init.path=/path/to/clip-vit-base-patch16
"""

import argparse
import sys

from pretrain.weights import LAYOUTS, WeightsError, overrides


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog='python -m pretrain.weights',
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument('format', choices=sorted(LAYOUTS))
    parser.add_argument('path', help='the weights file or directory')
    args = parser.parse_args(argv)
    try:
        print(' '.join(overrides(args.format, args.path)))
    except WeightsError as e:
        print(f'error: {e}', file=sys.stderr)
        return 2
    return 0


if __name__ == '__main__':
    sys.exit(main())
