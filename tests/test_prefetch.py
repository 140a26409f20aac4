"""MeshPrefetcher: the plain loop's batches, and a state that counts only the consumed ones."""

import time

import jax
import numpy as np
import pytest
from ml_collections import ConfigDict

from conftest import read_metrics
from input_pipeline import transforms
from input_pipeline.loader import make_loader
from input_pipeline.sources.shapes import ShapesSource
from input_pipeline.tokenizers import ByteTokenizer
from pretrain import sharding

N, B = 40, 8  # 5 batches an epoch
FIELDS = ["image", "text", "id"]


class _BlankCaptions:
    """Shapes records whose captions at `bad` indices are empty (a bad record for Tokenize)."""

    def __init__(self, bad=()):
        self.inner, self.bad = ShapesSource(image_size=16, num_records=N), set(bad)

    def __len__(self):
        return len(self.inner)

    def __getitem__(self, index):
        record = self.inner[index]
        return {**record, "caption": ""} if index in self.bad else record


def _loader(bad=(), **kw):
    steps = [transforms.Tokenize("caption", ByteTokenizer(16)), transforms.SelectFields(FIELDS)]
    kw = {"global_batch_size": B, "seed": 0, "max_bad_fraction": 0.5, **kw}
    return make_loader(_BlankCaptions(bad), steps, **kw)


def _mesh():
    return sharding.make_mesh(ConfigDict(dict(data=-1, fsdp=1, tensor=1)))


def _plain(n, **kw):
    """The first n batches of the plain loop, on the host."""
    with _loader(**kw) as loader:
        return [next(loader) for _ in range(n)]


def _assert_same(device_batches, host_batches):
    assert len(device_batches) == len(host_batches)
    for got, want in zip(device_batches, host_batches):
        assert got.keys() == want.keys()
        for k in want:
            assert isinstance(got[k], jax.Array)
            assert got[k].sharding == sharding.batch_sharding(_mesh()), k
            np.testing.assert_array_equal(np.asarray(got[k]), want[k], err_msg=k)


def _wait_until_ahead(loader, batches, timeout=30.0):
    # The thread fills its queue in the background; wait until it has, so the test sees
    # the loader well ahead of the consumer.
    deadline = time.time() + timeout
    while loader.get_state()["next_batch"] < batches:
        assert time.time() < deadline, "the prefetch thread did not run ahead"
        time.sleep(0.01)


@pytest.mark.parametrize("size", [0, 1, 3])
def test_prefetched_stream_equals_the_plain_stream(size):
    want = _plain(7)  # crosses an epoch boundary
    with _loader() as loader:
        data = sharding.MeshPrefetcher(loader, _mesh(), size=size)
        got = [next(data) for _ in range(7)]
        data.close()
    _assert_same(got, want)


def test_state_counts_consumed_batches_only_and_resumes_exactly():
    k, size = 3, 2
    want = _plain(k + 4, bad={5, 17})
    mesh = _mesh()
    with _loader(bad={5, 17}) as loader:
        data = sharding.MeshPrefetcher(loader, mesh, size=size)
        assert data.get_state()["next_batch"] == 0 and data.skipped == 0
        _assert_same([next(data) for _ in range(k)], want[:k])
        # The thread holds `size` placed batches and one more in hand: the loader is past k.
        _wait_until_ahead(loader, k + size + 1)
        state = data.get_state()
        assert state["next_batch"] == k
        with _loader(bad={5, 17}) as plain:  # the bad-record count of exactly k batches
            [next(plain) for _ in range(k)]
            assert data.skipped == plain.skipped > 0
        data.close()

    with _loader(bad={5, 17}) as resumed:  # a new run restoring the checkpointed state
        resumed.set_state(state)
        data = sharding.MeshPrefetcher(resumed, mesh, size=size)
        _assert_same([next(data) for _ in range(4)], want[k:])
        data.close()


def test_loader_errors_reach_the_consumer_and_close_is_final():
    with _loader(bad=range(0, N, 2), max_bad_fraction=0.1, bad_fraction_min_records=0) as loader:
        data = sharding.MeshPrefetcher(loader, _mesh(), size=2)
        with pytest.raises(RuntimeError, match="max_bad_fraction"):
            next(data)
        with pytest.raises(RuntimeError, match="max_bad_fraction"):
            next(data)  # not a hang: every later call raises too
        data.close()
        with pytest.raises(RuntimeError, match="closed"):
            next(data)


def test_finite_iterator_ends_with_stop_iteration():
    class _Two:
        skipped = 0

        def __init__(self):
            self.batches = iter([{"x": np.full((B, 2), i, np.int32)} for i in range(2)])
            self.taken = 0

        def __next__(self):
            batch = next(self.batches)
            self.taken += 1
            return batch

        def get_state(self):
            return {"next_batch": self.taken}

    data = sharding.MeshPrefetcher(_Two(), _mesh(), size=2)
    assert [int(np.asarray(b["x"])[0, 0]) for b in data] == [0, 1]
    assert data.get_state() == {"next_batch": 2}
    data.close()


def test_negative_size_is_an_error():
    with pytest.raises(ValueError, match="device prefetch size must be >= 0, got -1"):
        sharding.MeshPrefetcher(_loader(), _mesh(), size=-1)


@pytest.mark.slow  # two short training runs, ~30-40 s on the shared 2-core machine
def test_training_with_and_without_device_prefetch_logs_the_same_losses(tmp_path):
    import json

    from conftest import TINY
    from pretrain import config_cli, train

    def losses(device_prefetch):
        overrides, _ = config_cli.parse_overrides(
            TINY
            + [
                '--config.total_steps=4',
                '--config.log_every=1',
                f'--config.input.device_prefetch={device_prefetch}',
            ]
        )
        workdir = str(tmp_path / str(device_prefetch))
        train.run(config_cli.build_config('configs/clip.py', overrides), workdir)
        return {r['step']: r['train/loss'] for r in read_metrics(workdir) if 'train/loss' in r}

    plain, prefetched = losses(0), losses(3)
    assert sorted(plain) == [1, 2, 3, 4]
    assert prefetched == plain
