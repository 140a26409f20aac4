"""NNX model definitions shared by pre-training and finetuning."""

import flax

# Parameters carry logical axis names, but are placed on devices by jit out_shardings
# computed from those names (pretrain/train.py), never at creation: eager sharding would
# demand a mesh just to build a model in a test or a notebook.
flax.config.update('flax_always_shard_variable', False)
