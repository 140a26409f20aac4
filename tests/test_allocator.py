"""pretrain.allocator: which malloc the entry points re-execute with."""

import os
import sys

import pytest

from pretrain import allocator

linux = pytest.mark.skipif(not sys.platform.startswith('linux'), reason='Linux only')


def env_for(monkeypatch, choice=None, **environ):
    if choice is None:
        monkeypatch.delenv('PRETRAIN_MALLOC', raising=False)
    else:
        monkeypatch.setenv('PRETRAIN_MALLOC', choice)
    return allocator.malloc_env(environ)


@linux
def test_mimalloc_is_installed_with_the_package():
    library = allocator.mimalloc_library()
    assert library is not None and os.path.isfile(library), library


@linux
def test_auto_preloads_mimalloc_and_keeps_its_memory(monkeypatch):
    monkeypatch.setattr(allocator, 'accelerator_plugin_installed', lambda: False)
    env = env_for(monkeypatch, PATH='/bin')
    assert env['LD_PRELOAD'] == allocator.mimalloc_library()
    assert env['MIMALLOC_PURGE_DELAY'] == '-1'
    assert env[allocator.REEXEC_MARK] == '1' and env['PATH'] == '/bin'
    assert 'GLIBC_TUNABLES' not in env
    # A mimalloc option the user set wins.
    assert env_for(monkeypatch, MIMALLOC_PURGE_DELAY='10')['MIMALLOC_PURGE_DELAY'] == '10'


@linux
def test_without_mimalloc_auto_falls_back_to_glibc_tunables(monkeypatch):
    monkeypatch.setattr(allocator, 'mimalloc_library', lambda: None)
    env = env_for(monkeypatch, GLIBC_TUNABLES='glibc.malloc.tcache_count=16')
    assert 'LD_PRELOAD' not in env
    assert env['GLIBC_TUNABLES'] == 'glibc.malloc.tcache_count=16:' + allocator.GLIBC_TUNABLES
    with pytest.raises(SystemExit, match='cmeel-mimalloc package is not installed'):
        env_for(monkeypatch, 'mimalloc')


@linux
def test_auto_keeps_glibc_tunables_on_accelerator_hosts(monkeypatch):
    class Dist:
        metadata = {'Name': 'jax-cuda12-plugin'}

    monkeypatch.setattr(allocator.importlib.metadata, 'distributions', lambda: [Dist()])
    assert allocator.accelerator_plugin_installed()
    env = env_for(monkeypatch)
    assert env['GLIBC_TUNABLES'] == allocator.GLIBC_TUNABLES and 'LD_PRELOAD' not in env
    # Asked for by name, mimalloc is used there too.
    assert env_for(monkeypatch, 'mimalloc')['LD_PRELOAD'] == allocator.mimalloc_library()


@linux
def test_glibc_choice_sets_tunables_even_with_mimalloc_installed(monkeypatch):
    env = env_for(monkeypatch, 'glibc')
    assert env['GLIBC_TUNABLES'] == allocator.GLIBC_TUNABLES and 'LD_PRELOAD' not in env


def test_nothing_changes_for_system_a_preload_or_a_second_start(monkeypatch):
    for choice, environ in (
        ('system', {}),
        (None, {'LD_PRELOAD': '/usr/lib/libjemalloc.so'}),
        ('mimalloc', {allocator.REEXEC_MARK: '1'}),
    ):
        assert env_for(monkeypatch, choice, **environ) == environ


def test_bad_choice_names_the_valid_ones(monkeypatch):
    with pytest.raises(SystemExit, match="PRETRAIN_MALLOC='tuned'; valid: auto, mimalloc, glibc"):
        env_for(monkeypatch, 'tuned')


@linux
def test_entry_point_runs_with_mimalloc_mapped(python):
    # The re-executed process has mimalloc in its address space; PRETRAIN_MALLOC=system not.
    code = (
        'from pretrain import allocator; allocator.ensure_fast_malloc(); '
        "print(any('libmimalloc' in line for line in open('/proc/self/maps')))"
    )
    assert python(['-c', code], env={'PRETRAIN_MALLOC': 'mimalloc'}).stdout.strip() == 'True'
    assert python(['-c', code], env={'PRETRAIN_MALLOC': 'system'}).stdout.strip() == 'False'
