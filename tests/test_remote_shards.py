"""Shards from HTTP and S3 (real servers on loopback: stdlib http.server, moto in server mode)
through the node-local cache: same samples as from disk, faults retried, bound respected."""
from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest
import torch

from beit3.data_pipeline import DataConfig, DataConfigError, ImageMaskConfig, PretrainLoader, write_manifest
from beit3.testing.loopback import GCSShardServer, HTTPShardServer, S3ShardServer
from beit3.data_pipeline.remote import expand_remote, redact
from beit3.data_pipeline.shard_cache import NodeShardCache, cache_name
from beit3.data_pipeline.shards import TarIndex, resolve_shards

SOURCES = ("image", "text", "pair")
MANIFESTS = {"image": "shards/images/manifest.json", "text": "shards/texts/manifest.json",
             "pair": "shards/pairs/manifest.json"}


def make_cfg(demo, specs: dict[str, str], cache: Path, **kw) -> DataConfig:
    base = dict(image_shards=[specs["image"]], text_shards=[specs["text"]], pair_shards=[specs["pair"]],
                images=8, texts=8, pairs=8, img_size=32, patch_size=8, image_mask=ImageMaskConfig(min_block_patches=2),
                max_text_len=24, max_pair_text_len=16, spm_path=demo.spm_path, num_workers=0,
                shuffle_window_shards=2, seed=3, cache_dir=str(cache), remote_backoff_s=0.01)
    base.update(kw)
    return DataConfig(**base)


def local_specs(root: Path) -> dict[str, str]:
    return {s: str(root / m) for s, m in MANIFESTS.items()}


def run(cfg: DataConfig, rank: int, world: int, steps: int) -> list[dict]:
    out = []
    for batch in PretrainLoader(cfg, rank, world):
        out.append(batch)
        if len(out) == steps:
            return out
    raise AssertionError("unreachable")


def assert_same_batches(got: list[dict], ref: list[dict], sources=SOURCES) -> None:
    assert len(got) == len(ref)
    for g, r in zip(got, ref):
        assert g["step"] == r["step"]
        for src in sources:
            assert g[src]["sample_ids"].tolist() == r[src]["sample_ids"].tolist(), (src, g["step"])
            for k, v in r[src].items():
                torch.testing.assert_close(g[src][k], v, rtol=0, atol=0, msg=f"{src}.{k}")


# ---- specs, URLs, config ----------------------------------------------------------------------
def test_specs_urls_and_config_fields(tmp_path):
    assert expand_remote("s3://b/shards-{000..002}.tar") == [f"s3://b/shards-{k:03d}.tar" for k in range(3)]
    assert expand_remote("pipe:curl -s http://h/s-{0..1}.tar") == ["pipe:curl -s http://h/s-0.tar",
                                                                   "pipe:curl -s http://h/s-1.tar"]
    assert redact("https://user:secret@h.example/s.tar?X-Amz-Signature=abc") == "https://***@h.example/s.tar?***"
    with pytest.raises(DataConfigError, match="data.image_shards.*globs need a listing"):
        resolve_shards(["http://127.0.0.1:9/shards-*.tar"], "data.image_shards")
    with pytest.raises(DataConfigError, match="data.image_shards.*needs the node cache"):
        resolve_shards(["https://h.example/a-{0..1}.tar"], "data.image_shards")
    for field, bad in (("cache_size_gb", 0), ("remote_retries", -1), ("remote_backoff_s", -1.0),
                       ("remote_prefetch_threads", 1.5)):
        with pytest.raises(DataConfigError, match=f"data.{field}"):
            DataConfig(**{field: bad})
    with pytest.raises(DataConfigError, match="cache_sise_gb"):
        DataConfig.from_dict({"cache_sise_gb": 1})
    assert cache_name("s3://b/x/shard-000.tar") != cache_name("s3://c/x/shard-000.tar")


def test_pipe_shards_and_partial_download_never_used(demo_data, tmp_path):
    """pipe:CMD reads a command's stdout; a command that fails half-way leaves nothing in the cache."""
    shard = Path(demo_data.root) / "shards/images/images-000000.tar"
    cache = NodeShardCache(str(tmp_path / "c"), 1 << 30, retries=1, backoff_s=0.0)
    bad = f"pipe:head -c 5000 {shard}; exit 3"
    with pytest.raises(OSError, match="unreachable after 2 attempt"):
        cache.open(bad)
    assert not list((tmp_path / "c").glob("*.tar")) and not list((tmp_path / "c").glob("*.part-*"))
    assert cache.take_stats() == {"retry": 1, "failed": 1}
    sl = resolve_shards([f"pipe:cat {shard}"], "data.image_shards", cache)
    assert sl.counts == (100,)
    index = TarIndex(sl.paths[0], cache.open(sl.paths[0]))
    assert index[5] == TarIndex(shard)[5] | {"__url__": f"pipe:cat {shard}"}
    assert cache.take_stats() == {"fetch": 1, "fetched_bytes": shard.stat().st_size, "hit": 1}
    # a local manifest of remote shards (write_manifest), read back with their full locations
    images = shard.parent
    assert write_manifest.main([f"pipe:cat {images}/images-00000{{0..1}}.tar", "--source", "image", "--out",
                                str(tmp_path / "m.json"), "--cache-dir", str(tmp_path / "c")]) == 0
    sl = resolve_shards([str(tmp_path / "m.json")], "data.image_shards")
    assert sl.paths == (f"pipe:cat {images}/images-000000.tar", f"pipe:cat {images}/images-000001.tar")
    assert sl.counts == (100, 100)


# ---- same samples as from disk -----------------------------------------------------------------
@pytest.mark.slow
def test_http_s3_and_gcs_give_the_local_batches_2_ranks_2_workers(demo_data, tmp_path, caplog):
    root = Path(demo_data.root)
    steps, world = 3, 2
    ref = [run(make_cfg(demo_data, local_specs(root), tmp_path / "unused"), r, world, steps) for r in range(world)]
    with HTTPShardServer(root) as http, S3ShardServer() as s3, GCSShardServer() as gcs:
        base, gbase = s3.upload(root / "shards", "demo", "shards/"), gcs.upload(root / "shards", "demo", "shards/")
        remotes = {"http": {s: http.url(m) for s, m in MANIFESTS.items()},
                   "s3": {s: f"{base}/{m.split('/', 1)[1]}" for s, m in MANIFESTS.items()},
                   "gs": {s: f"{gbase}/{m.split('/', 1)[1]}" for s, m in MANIFESTS.items()}}
        for name, specs in remotes.items():
            cfg = make_cfg(demo_data, specs, tmp_path / f"cache-{name}", num_workers=2)
            with caplog.at_level(logging.INFO, logger="beit3.data_pipeline"):
                got = [run(cfg, r, world, steps) for r in range(world)]
            # this process forked workers between its remote reads: none of them may time out and
            # be retried (fsspec clients are closed before each fork, see remote._before_fork)
            assert not [r.getMessage() for r in caplog.records if "retrying" in r.getMessage()]
            for r in range(world):
                assert_same_batches(got[r], ref[r])
                assert not {k for k in got[r][-1]["stats"] if not k.startswith("cache/")}, got[r][-1]["stats"]
        # one node: every shard was downloaded once, by whichever rank/worker/prefetch thread came first
        gets = {name: n for (method, name), n in http.requests.items() if method == "GET" and name.endswith(".tar")}
        assert gets and set(gets.values()) == {1}, gets
        cached = sorted(p.name for p in (tmp_path / "cache-http").glob("*.tar"))
        assert cached == sorted(cache_name(http.url(n)) for n in gets)


# ---- faults --------------------------------------------------------------------------------------
def test_dropped_and_500_are_retried_unreachable_shard_skipped_and_named(demo_data, tmp_path, caplog):
    root = Path(demo_data.root)
    broken = tmp_path / "local"  # the local twin: the unreachable pair shard is an unreadable file
    shutil.copytree(root / "shards", broken / "shards")
    (broken / "shards/pairs/pairs-000002.tar").write_bytes(b"\0garbage" * 64)
    ref = run(make_cfg(demo_data, local_specs(broken), tmp_path / "unused"), 0, 1, 6)
    assert ref[-1]["stats"]["pair/shard_unreadable"] > 0
    with HTTPShardServer(root) as http:
        http.inject("shards/images/images-000002.tar", "drop")
        http.inject("shards/images/images-000001.tar", "500", "drop")
        http.inject("shards/texts/manifest.json", "500")  # start-up reads are retried too
        http.unreachable.add("shards/pairs/pairs-000002.tar")
        cfg = make_cfg(demo_data, {s: http.url(m) for s, m in MANIFESTS.items()}, tmp_path / "cache",
                       remote_retries=3, remote_prefetch_threads=0)
        with caplog.at_level(logging.INFO, logger="beit3.data_pipeline"):
            got = run(cfg, 0, 1, 6)
        served = dict(http.faults_served)
        before = dict(http.requests)  # another process of the node skips the dead shard at once
        other = NodeShardCache(str(tmp_path / "cache"), 1 << 30, retries=3, backoff_s=0.01)
        with pytest.raises(OSError, match="given up on"):
            other.open(http.url("shards/pairs/pairs-000002.tar"))
        assert http.requests == before
    assert served.pop("503") >= 4 and served == {"drop": 2, "500": 2}  # 503: 1 + 3 retries of the dead shard
    assert_same_batches(got, ref)
    stats = got[-1]["stats"]
    assert stats["cache/retry"] == 3 + 3 and stats["cache/failed"] == 1
    assert stats["pair/shard_unreadable"] == ref[-1]["stats"]["pair/shard_unreadable"]
    dead = http.url("shards/pairs/pairs-000002.tar")
    assert any(dead in r.getMessage() and "unreachable" in r.getMessage() and r.levelno == logging.WARNING
               for r in caplog.records)
    assert not list((tmp_path / "cache").glob("*.part-*"))


# ---- bound -----------------------------------------------------------------------------------------
def test_cache_smaller_than_the_shuffle_window_keeps_its_bound(demo_data, tmp_path):
    """Room for 2 of the 4 image shards of one window: eviction and refetch, the same samples."""
    root = Path(demo_data.root)
    sizes = [p.stat().st_size for p in (root / "shards/images").glob("*.tar")]
    bound = int(2.5 * max(sizes))
    kw = dict(texts=0, pairs=0, shuffle_window_shards=4, cache_size_gb=bound / (1 << 30))
    ref = run(make_cfg(demo_data, local_specs(root), tmp_path / "unused", **kw), 0, 1, 8)
    cache_dir = tmp_path / "cache"
    with HTTPShardServer(root) as http:
        cfg = make_cfg(demo_data, {s: http.url(m) for s, m in MANIFESTS.items()}, cache_dir, **kw)
        got, peak = [], 0
        for batch in PretrainLoader(cfg, 0, 1):
            peak = max(peak, sum(p.stat().st_size for p in cache_dir.glob("*.tar")))
            got.append(batch)
            if len(got) == 8:
                break
        gets = [n for (m, name), n in http.requests.items() if m == "GET" and name.endswith(".tar")]
    assert_same_batches(got, ref, ("image",))
    stats = got[-1]["stats"]
    assert 0 < peak <= bound
    assert stats["cache/evict"] > 0 and max(gets) >= 2  # evicted shards came back on demand
    assert stats["cache/fetch"] + stats.get("cache/prefetch", 0) <= sum(gets)  # prefetches after the last batch
    assert len(list(cache_dir.glob("*.tar"))) <= 2
