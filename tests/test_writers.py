"""Parallel shard writers: ``--workers 1`` and ``--workers 2`` write byte-identical shards."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from beit3.data_pipeline import write_images, write_pairs, write_texts
from beit3.demo.digits import write_corpus, write_digits_image_folder, write_digits_pairs_tsv
from beit3.data_pipeline.tokenizer import TextTokenizer
from beit3.data_pipeline.writing import ordered_map, worker_pool


def _tree(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("writers")
    folder = write_digits_image_folder(root / "digits", size=24, limit=90, fmt="jpg")
    (folder / "three" / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")  # skipped, counted
    tsv = write_digits_pairs_tsv(root / "pairs", size=24, limit=70)
    with tsv.open("a") as f:
        f.write("images/00003.jpg\t   \n")  # empty caption
        f.write("images/missing.jpg\ta caption\n")  # missing image
    corpus = write_corpus(root / "corpus.txt", 60)
    TextTokenizer.train([str(corpus)], root / "spm", vocab_size=300)
    return root, folder, tsv, corpus


@pytest.mark.parametrize("tool", ["images", "pairs", "texts"])
def test_one_and_two_workers_write_identical_shards(inputs, tmp_path, tool, capsys):
    root, folder, tsv, corpus = inputs
    args = {"images": [str(folder)], "pairs": [str(tsv)],
            "texts": [str(corpus), str(corpus), "--spm", str(root / "spm.model"), "--segment-len", "30"]}[tool]
    main = {"images": write_images.main, "pairs": write_pairs.main, "texts": write_texts.main}[tool]
    trees, reports = [], []
    for workers in (1, 2):
        out = tmp_path / f"w{workers}"
        pos = args[:1] if tool != "texts" else args[:2]
        rest = args[len(pos):]
        assert main([*pos, str(out), *rest, "--maxcount", "16", "--maxsize", "20000", "--workers", str(workers),
                     "-q"]) == 0
        trees.append(_tree(out))
        reports.append(capsys.readouterr().out.strip().splitlines()[-1].replace(str(out), "OUT"))
    assert trees[0] == trees[1] and reports[0] == reports[1]
    man = json.loads(trees[0]["manifest.json"])
    assert len(man["shards"]) >= 3 and man["total"] == sum(s["count"] for s in man["shards"])
    expect = {"images": "corrupt_image': 1", "pairs": "'missing_or_corrupt_image': 1, 'empty_text': 1", "texts": ""}[tool]
    assert expect in reports[0]


def _square(x: int) -> int:
    if x == 7:
        raise ValueError("seven")
    return x * x


def test_ordered_map_keeps_order_streams_and_propagates_errors():
    with worker_pool(1) as one:
        assert list(ordered_map(_square, range(7), one)) == [x * x for x in range(7)]
    with worker_pool(2) as two:
        assert list(ordered_map(_square, iter(range(7)), two, chunksize=2)) == [x * x for x in range(7)]
        with pytest.raises(ValueError, match="seven"):
            list(ordered_map(_square, range(20), two, chunksize=3))
    with pytest.raises(ValueError, match="--workers"):
        with worker_pool(0):
            pass


def _sigterm_is_default(_: int) -> bool:
    import signal

    return signal.getsignal(signal.SIGTERM) == signal.SIG_DFL


def test_pool_workers_do_not_inherit_a_flag_only_sigterm_handler():
    """The parent's SIGTERM handler (a trainer's or the supervisor's, which only set a flag) is not
    the workers': ``Pool.terminate`` SIGTERMs a worker that waits for the task queue's lock held by
    the parent, and with the inherited handler it never died (a CI run hung on it)."""
    import signal

    previous = signal.signal(signal.SIGTERM, lambda *_: None)
    try:
        with worker_pool(2) as two:
            assert list(ordered_map(_sigterm_is_default, range(4), two, chunksize=1)) == [True] * 4
    finally:
        signal.signal(signal.SIGTERM, previous)


_EARLY_TERMINATE = """
import os, signal, time
from beit3.data_pipeline.writing import ordered_map, worker_pool

signal.signal(signal.SIGTERM, lambda *_: None)  # a trainer's flag-only handler
forks = [0]
os.register_at_fork(before=lambda: forks.__setitem__(0, forks[0] + 1),
                    after_in_child=lambda: forks[0] == 2 and time.sleep(2))  # the second worker starts late
with worker_pool(2) as two:
    assert list(ordered_map(abs, range(-4, 0), two, chunksize=1)) == [4, 3, 2, 1]  # done by the first worker
print("pool closed")  # Pool.terminate's SIGTERM reached the second worker before its initializer ran
"""


@pytest.mark.slow
def test_a_terminate_before_a_worker_set_its_handlers_still_ends_it():
    """The race behind a hang under load (pytest-xdist, 2 workers on 2 cores): ``Pool.terminate`` sent
    SIGTERM to a worker still running the parent's flag-only handler; the worker then waited on the task
    queue's lock forever and the pool's exit with it. Made deterministic by a worker that starts 2 s late.
    ``run_job`` bounds it: a pool exit still waiting after 30 s fails the test and kills the pool's group."""
    import sys

    from beit3.testing.jobs import run_env, run_job

    rc, out = run_job([sys.executable, "-c", _EARLY_TERMINATE], run_env(), timeout=30)
    assert rc == 0 and "pool closed" in out, out[-2000:]
