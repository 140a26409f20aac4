"""Part of an epoch through the training loader, checkpointed as the trainer does it.

    python launch/local.py -n 2 -- python tests/elastic_data_run.py --workdir W --batches 5

Each process (one, or several under launch/local.py) builds the real `Loader` over a small
source whose records carry only an `id`, restores the latest checkpoint in W with
`pretrain.checkpoint.Checkpointer` (the loader state goes through orbax next to a small
sharded array, as it goes next to the train state), consumes `--batches` global batches,
writes the ids it consumed to W/ids/<step>.<process>.json and saves a checkpoint at the new
step. tests/test_multiprocess.py checks that runs with different process counts together
read every id of the epoch exactly once.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


class IdSource:
    """`num_records` records {'id': i}: random access, like every grain source here."""

    def __init__(self, num_records: int):
        self.num_records = num_records

    def __len__(self):
        return self.num_records

    def __getitem__(self, index: int):
        return {'id': index}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument('--workdir', required=True)
    parser.add_argument('--batches', type=int, required=True)
    parser.add_argument('--records', type=int, default=96)
    parser.add_argument('--batch_size', type=int, default=8)
    args = parser.parse_args()

    from pretrain import distributed

    distributed.initialize()
    import jax
    import numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P
    from ml_collections import ConfigDict

    from input_pipeline.loader import Loader
    from pretrain import checkpoint

    loader = Loader(
        IdSource(args.records),
        [],
        global_batch_size=args.batch_size,
        seed=3,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    )
    mesh = jax.make_mesh((jax.device_count(),), ('data',))
    sharding = NamedSharding(mesh, P('data'))
    ckpt = checkpoint.Checkpointer(
        args.workdir, ConfigDict(dict(every=1, keep=10, keep_every=0, async_save=True))
    )
    start = ckpt.latest_step() or 0
    # Shape fixed across process counts; restored onto this run's devices like a train state.
    state = {'x': jax.device_put(np.arange(4, dtype=np.float32), sharding)}
    if start:
        state, data_state = ckpt.restore(start, checkpoint.abstract_like(state, {'x': sharding}))
        loader.set_state(data_state)
    ids = [int(i) for _ in range(args.batches) for i in next(loader)['id']]
    out = os.path.join(args.workdir, 'ids')
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, f'{start}.{jax.process_index()}.json'), 'w') as f:
        json.dump(ids, f)
    ckpt.save(start + args.batches, state, loader.get_state(), {}, force=True)
    loader.close()
    ckpt.close()


if __name__ == '__main__':
    main()
