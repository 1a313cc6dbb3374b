"""Per-rank micro-batch loaders with exact mixing ratios and a resumable, world-size-independent position.

Global step ``s`` of source X consumes positions ``[s*C, (s+1)*C)`` of X's global sample sequence
(``C`` = the configured global count, see ``sequence.py``). Micro-step ``m`` of ``G`` takes the
contiguous chunk ``[m*C/G, (m+1)*C/G)`` of it, and rank ``r`` of ``W`` takes its ``b = C/(W*G)``
slice ``[(m*W + r)*b, (m*W + r + 1)*b)``. Every (rank, micro-step) therefore gets exactly ``b``
samples of every enabled source, and the set of samples of a step depends on the seed and the
step only. A sample that cannot be used is replaced by a deterministic draw from the same
shuffle window (counted under ``stats``), so the counts stay exact.

The loader state is the number of micro-batches handed to the caller (prefetched batches in
worker processes are not counted) plus the checks needed to refuse an incompatible resume.
"""
from __future__ import annotations

import hashlib
import itertools
import logging
import tarfile
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from .augment import finish_views
from .config import DataConfig, DataConfigError, check_batch_arithmetic
from .samples import ImageViews, SkipSample, TextMasker, text_body
from .sequence import GlobalSampleSequence, sample_rng
from .remote import is_remote
from .shard_cache import NodeShardCache, Prefetcher
from .shards import ShardCache, ShardList, read_manifest, resolve_shards
from .tokenizer import TextTokenizer

logger = logging.getLogger(__name__)
STATE_VERSION = 1


class SourceStream:
    """Samples of one source by global position, with deterministic replacement of bad ones."""

    def __init__(self, source: str, shards: ShardList, cfg: DataConfig,
                 process: Callable[[dict[str, Any], np.random.Generator], dict[str, Any]],
                 remote: NodeShardCache | None = None) -> None:
        self.source, self.shards, self.cfg, self.process = source, shards, cfg, process
        self.seq = GlobalSampleSequence(shards.counts, cfg.seed, source, cfg.shuffle_window_shards)
        self.cache = ShardCache(max_open=2 * cfg.shuffle_window_shards + 2, remote=remote)
        self.prefetcher = (Prefetcher(remote, cfg.remote_prefetch_threads)
                           if remote is not None and any(map(is_remote, shards.paths)) else None)

    def _prefetch(self, position: int) -> None:
        """Queue the remote shards of this position's shuffle window and the next one (once per window)."""
        key, ids = self.seq.windows_ahead(position)
        self.prefetcher.ahead(key, [p for p in (self.shards.paths[i] for i in ids) if is_remote(p)])

    def get(self, position: int, stats: Counter) -> tuple[dict[str, Any], int, np.random.Generator]:
        """(processed sample, global sample id, its generator) for ``position``; skips are added to ``stats``."""
        if self.prefetcher is not None:
            self._prefetch(position)
        for attempt in range(self.cfg.max_skip_retries + 1):
            rng = sample_rng(self.cfg.seed, self.source, position, attempt)
            replacement = None if attempt == 0 else int(rng.integers(1 << 62))
            shard, offset, sid = self.seq.locate(position, replacement)
            try:
                raw = self.cache.get(self.shards.paths[shard])[offset]
            except IndexError:
                stats[f"{self.source}/missing_sample"] += 1
                continue
            except (OSError, EOFError, tarfile.TarError) as e:
                stats[f"{self.source}/shard_unreadable"] += 1
                logger.debug("%s: %s", self.shards.paths[shard], e)
                continue
            try:
                return self.process(raw, rng), sid, rng
            except SkipSample as e:
                stats[f"{self.source}/{e.reason}"] += 1
                logger.debug("skip %s sample %s: %s", self.source, sid, e)
        raise RuntimeError(f"{self.source}: {self.cfg.max_skip_retries + 1} consecutive unusable samples around "
                           f"position {position}; the shards look broken (see the skip counters)")


def _collate(items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    return {k: torch.stack([it[k] for it in items]) for k in items[0]}


class MicroBatchDataset(Dataset):
    """Index ``k`` (= step * grad_accum + micro) -> this rank's micro-batch of every source."""

    def __init__(self, cfg: DataConfig, shards: dict[str, ShardList], per_rank: dict[str, int], rank: int,
                 world_size: int, grad_accum: int, image_only: bool = False, with_mask: bool = True,
                 remote: bool = False) -> None:
        self.cfg, self.shards, self.per_rank, self.remote = cfg, shards, per_rank, remote
        self._node_cache: NodeShardCache | None = None
        self.rank, self.world_size, self.grad_accum = rank, world_size, grad_accum
        self.image_only, self.with_mask = image_only, with_mask
        self.finish_in_worker = image_only or cfg.augment_on == "cpu"  # else the step calls finish_views
        self._streams: dict[str, SourceStream] | None = None
        self._views: ImageViews | None = None

    def _build(self) -> dict[str, SourceStream]:
        cfg = self.cfg
        views = self._views = ImageViews(cfg)
        streams: dict[str, SourceStream] = {}
        masker = None
        if "text" in self.per_rank or "pair" in self.per_rank:
            tok = TextTokenizer(cfg.spm_path)
            masker = TextMasker(tok, cfg)
        tm = cfg.text_mask

        def image(raw: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
            out = views(raw, rng)
            if self.image_only:
                cls = raw.get("cls")
                out["labels"] = torch.tensor(int(cls) if cls is not None and cls.strip().isdigit() else -1)
            return out

        def text(raw: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
            body = text_body(raw, tok)
            return masker(body, cfg.max_text_len, tm.text_ratio, rng, str(raw.get("__key__")))

        def pair(raw: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
            body = text_body(raw, tok)  # text first: cheap, and an empty caption skips the decode
            out = masker(body, cfg.max_pair_text_len, tm.pair_ratio, rng, str(raw.get("__key__")))
            out.update(views(raw, rng))
            return out

        fns = {"image": image, "text": text, "pair": pair}
        if self.remote:  # one per process (each worker counts its own downloads)
            self._node_cache = NodeShardCache.from_config(cfg)
        for src in self.per_rank:
            streams[src] = SourceStream(src, self.shards[src], cfg, fns[src], self._node_cache)
        return streams

    def __getitem__(self, k: int) -> dict[str, Any]:
        if self._streams is None:
            self._streams = self._build()
        step, micro = divmod(int(k), self.grad_accum)
        stats: Counter = Counter()
        batch: dict[str, Any] = {"index": int(k)}
        for src, b in self.per_rank.items():
            count = b * self.world_size * self.grad_accum
            base = step * count + (micro * self.world_size + self.rank) * b
            items, ids, rngs = [], [], []
            for j in range(b):
                item, sid, rng = self._streams[src].get(base + j, stats)
                items.append(item)
                ids.append(sid)
                rngs.append(rng)
            out = _collate(items)
            if self.finish_in_worker:
                finish_views(out)
            if src != "text" and self.with_mask:  # block masks of the whole micro-batch at once
                out["image_mask"] = torch.from_numpy(self._views.masker.batch(rngs))
            out["sample_ids"] = torch.tensor(ids, dtype=torch.long)
            batch[src] = out
        if self._node_cache is not None:  # downloads, hits, retries, evictions ("cache/..." counters)
            stats.update({f"cache/{k}": v for k, v in self._node_cache.take_stats().items()})
        batch["skips"] = dict(stats)
        return batch

    def __len__(self) -> int:  # an infinite stream; the sampler drives it
        return 1 << 62


def _check_text_tokenizer(cfg: DataConfig) -> None:
    """Text shards store token ids: refuse shards tokenized with another SentencePiece model."""
    ours = hashlib.md5(Path(cfg.spm_path).read_bytes()).hexdigest()
    for spec in cfg.text_shards:
        if not spec.endswith(".json"):
            continue
        meta = read_manifest(spec, "data.text_shards").get("meta", {})
        if meta.get("spm_md5") not in (None, ours):
            raise DataConfigError(f"data.text_shards: {spec} was tokenized with {meta.get('spm')} (md5 "
                                  f"{meta['spm_md5']}), but data.spm_path={cfg.spm_path} has md5 {ours}; "
                                  f"re-run write_texts or point spm_path at the same model")


class _CountFrom(Sampler[int]):
    def __init__(self, start: int) -> None:
        self.start = start

    def __iter__(self) -> Iterator[int]:
        return itertools.count(self.start)


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)


class _LoaderBase:
    """Shared machinery: shard resolution, the DataLoader over micro-batch indices, the state."""

    def __init__(self, cfg: DataConfig, rank: int, world_size: int, grad_accum: int,
                 per_rank: dict[str, int], image_only: bool, with_mask: bool) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world_size {world_size}")
        self.cfg, self.rank, self.world_size, self.grad_accum = cfg, rank, world_size, grad_accum
        self.per_rank = per_rank
        cfg.require_inputs(tuple(per_rank))
        remote = any(is_remote(spec) for src in per_rank for spec in cfg.shards(src))
        node_cache = NodeShardCache.from_config(cfg) if remote else None  # for counting shards without manifest
        self.shards = {src: resolve_shards(cfg.shards(src), f"data.{src}_shards", node_cache) for src in per_rank}
        remote = remote or any(is_remote(p) for sl in self.shards.values() for p in sl.paths)
        if "text" in per_rank or "pair" in per_rank:
            tok = TextTokenizer(cfg.spm_path)  # fails now, not in a worker, if the model is missing
            logger.info("text tokenizer %s: vocab_size=%d mask_id=%d", cfg.spm_path, tok.vocab_size, tok.mask_id)
        if "text" in per_rank:
            _check_text_tokenizer(cfg)
        self.dataset = MicroBatchDataset(cfg, self.shards, per_rank, rank, world_size, grad_accum,
                                         image_only=image_only, with_mask=with_mask, remote=remote)
        self._position = 0  # micro-batches handed to the caller
        self._dl: "DataLoader | None" = None  # built at the first iteration with workers, kept until close()
        self.stats: Counter = Counter()
        for src, sl in self.shards.items():
            logger.info("%s source: %d shard(s), %d samples, %d per rank per micro-step",
                        src, len(sl.paths), sl.total, per_rank[src])

    # ---- iteration -------------------------------------------------------------------------
    def _batches(self) -> Iterator[dict[str, Any]]:
        cfg = self.cfg
        if cfg.num_workers == 0:
            it: Iterator = (self.dataset[k] for k in itertools.count(self._position))
        else:
            it = self._workers_from(self._position)
        for batch in it:
            if batch["index"] != self._position:
                raise RuntimeError(f"loader out of order: got {batch['index']}, expected {self._position}")
            self.stats.update(batch.pop("skips"))
            self._position += 1
            batch["stats"] = dict(self.stats)
            batch["step"], batch["micro_step"] = divmod(batch.pop("index"), self.grad_accum)
            yield batch

    def _workers_from(self, position: int) -> Iterator[dict[str, Any]]:
        """The worker processes' stream from ``position``. The workers are forked once, at the first
        iteration, and kept (``persistent_workers``): a rollback or a seek re-points the sampler and
        the same workers go on (their prefetched micro-batches are dropped), so the trainer never
        forks again from a process that by then runs checkpoint-writer, watchdog and collective
        threads (a fork copies whatever lock such a thread holds at that instant). ``close()`` ends them."""
        cfg = self.cfg
        if self._dl is None:
            self._dl = DataLoader(self.dataset, batch_size=None, sampler=_CountFrom(position),
                                  num_workers=cfg.num_workers, prefetch_factor=cfg.prefetch_factor,
                                  worker_init_fn=_worker_init, persistent_workers=True, pin_memory=cfg.pin_memory,
                                  multiprocessing_context=cfg.worker_start_method or None)
        self._dl.sampler.start = position
        return iter(self._dl)

    def close(self) -> None:
        """End the worker processes now (not at interpreter exit); a later iteration starts new ones."""
        dl, self._dl = self._dl, None
        it = getattr(dl, "_iterator", None)
        if it is not None and hasattr(it, "_shutdown_workers"):
            it._shutdown_workers()

    # ---- state -------------------------------------------------------------------------------
    def _counts(self) -> dict[str, int]:
        return {src: b * self.world_size * self.grad_accum for src, b in self.per_rank.items()}

    def state_dict(self) -> dict[str, Any]:
        """Position after the last micro-batch handed out (JSON-serializable, a few hundred bytes)."""
        step, micro = divmod(self._position, self.grad_accum)
        sources = {}
        for src, count in self._counts().items():
            consumed = step * count + micro * (count // self.grad_accum)
            total = self.shards[src].total
            sources[src] = {"consumed": consumed, "epoch": consumed // total, "offset_in_epoch": consumed % total,
                            **self.shards[src].fingerprint()}
        return {"version": STATE_VERSION, "seed": self.cfg.seed, "step": step, "micro_step": micro,
                "grad_accum": self.grad_accum, "world_size": self.world_size, "counts": self._counts(),
                "shuffle_window_shards": self.cfg.shuffle_window_shards, "sources": sources,
                "stats": dict(self.stats)}

    def seek(self, step: int) -> None:
        """The next batch is the first micro-batch of data step ``step + 1`` (a rollback's skip window)."""
        state = self.state_dict()
        state.update(step=step, micro_step=0)
        self.load_state_dict(state)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue exactly after the saved position (also on another world size / grad_accum /
        worker count, as long as the global counts, seed and shards are the same)."""
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"loader state version {state.get('version')} != {STATE_VERSION}")
        mismatches = []
        if state["seed"] != self.cfg.seed:
            mismatches.append(f"seed {state['seed']} -> {self.cfg.seed}")
        if state["counts"] != self._counts():
            mismatches.append(f"global counts {state['counts']} -> {self._counts()}")
        if state["shuffle_window_shards"] != self.cfg.shuffle_window_shards:
            mismatches.append(f"shuffle_window_shards {state['shuffle_window_shards']} -> {self.cfg.shuffle_window_shards}")
        for src, s in state["sources"].items():
            if src in self.shards and {k: s[k] for k in ("num_shards", "num_samples")} != self.shards[src].fingerprint():
                mismatches.append(f"{src} shards {s['num_shards']}/{s['num_samples']} -> {self.shards[src].fingerprint()}")
        if mismatches:
            raise ValueError("loader state does not match this configuration (the sample sequence would differ): "
                             + "; ".join(mismatches))
        g_old, micro = state["grad_accum"], state["micro_step"]
        if (micro * self.grad_accum) % g_old:
            raise ValueError(f"saved mid-step at micro-step {micro}/{g_old}, which is not a micro-step boundary "
                             f"with grad_accum={self.grad_accum}; resume with grad_accum={g_old} or from a step boundary")
        self._position = state["step"] * self.grad_accum + micro * self.grad_accum // g_old
        self.stats = Counter(state.get("stats", {}))

    @property
    def position(self) -> int:
        return self._position


class PretrainLoader(_LoaderBase):
    """Per-rank micro-batches of all enabled sources for BEiT-3 pretraining.

    ``for batch in PretrainLoader(cfg, rank, world_size, grad_accum)`` yields dicts with
    ``"image"`` (images [Bi,3,H,W] in [-1,1], image_mask bool [Bi,P], tokenizer_images [Bi,3,Ht,Wt]
    in [0,1] or codes long [Bi,P], sample_ids; with ``augment_on: device`` uint8 ``crops`` and the
    augmentation parameters instead of the two views: ``augment.finish_views`` renders them), ``"text"`` (text_ids, text_labels, text_mask,
    padding_mask: [Bt,L]), ``"pair"`` (both), ``"stats"`` (cumulative skip counters
    ``"source/reason"``), ``"step"``, ``"micro_step"``. Infinite.
    """

    def __init__(self, cfg: DataConfig, rank: int = 0, world_size: int = 1, grad_accum: int = 1) -> None:
        per_rank = check_batch_arithmetic(cfg, world_size, grad_accum)
        super().__init__(cfg, rank, world_size, grad_accum, {s: b for s, b in per_rank.items() if b > 0},
                         image_only=False, with_mask=True)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return self._batches()


class ImageLoader(_LoaderBase):
    """Image-only batches (e.g. VQ-KD tokenizer training, ImageNet): ``batch_size`` images per rank
    per step from ``cfg.image_shards``; yields {"images", "tokenizer_images" | "codes", "labels"
    ("cls" field or -1), "sample_ids", ["image_mask"], "stats", "step"}. Views are always finished
    in the workers (``augment_on`` applies to ``PretrainLoader``)."""

    def __init__(self, cfg: DataConfig, rank: int = 0, world_size: int = 1, batch_size: int = 64,
                 with_mask: bool = False) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        super().__init__(cfg, rank, world_size, 1, {"image": batch_size}, image_only=True, with_mask=with_mask)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for batch in self._batches():
            out = batch.pop("image")
            out.update(stats=batch["stats"], step=batch["step"])
            yield out


__all__ = ["PretrainLoader", "ImageLoader", "MicroBatchDataset", "SourceStream"]
