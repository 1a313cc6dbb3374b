"""A real 2-rank ZeRO-3 pretraining run with every step's host waits counted
(``runtime.host_syncs.HostSyncCounter``), for ``tests/test_host_syncs.py`` and ``bench/host_syncs.py``.

``measure`` launches this file on 2 ranks with the ``deepspeed`` launcher; each rank runs
``pretrain.train.main`` with the counter on and a new segment at every step (``step<N>``),
and writes its counts to ``$BEIT3_HOST_SYNCS_OUT.<rank>``.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

OUT_ENV = "BEIT3_HOST_SYNCS_OUT"
WARMUP = 2  # step 1 starts up; ZeRO-3 records its parameter trace and checks it across ranks in step 2


def rank_main(argv: list[str]) -> None:
    """One rank: ``train.main`` with every step counted; the counts to ``$BEIT3_HOST_SYNCS_OUT.<rank>``."""
    from beit3.pretrain import train
    from beit3.runtime.host_syncs import HostSyncCounter

    counter = HostSyncCounter()
    original = train.Pretrainer.train

    def counted(self):
        beat = self.watchdog.beat

        def marking(step, *a, **k):
            counter.mark(f"step{step}")
            return beat(step, *a, **k)

        self.watchdog.beat = marking
        with counter:
            try:
                return original(self)
            finally:
                counter.mark("after")

    train.Pretrainer.train = counted
    train.main(argv)
    path = f"{os.environ[OUT_ENV]}.{os.environ.get('RANK', '0')}"
    Path(path).write_text(json.dumps({k: dict(v) for k, v in counter.counts.items() if k}))


def measure(steps: int, accum: int, work: Path, fused: bool = True) -> list[dict[str, dict[str, int]]]:
    """Per rank: segment -> {"source kind": events}."""
    from beit3.demo.data import build_demo_data
    from beit3.testing.jobs import TEST_DATA_ARGS, launch, overrides
    from beit3.testing.tokenizers import make_tokenizer

    data = build_demo_data(work / "data", **TEST_DATA_ARGS)
    tok = make_tokenizer(work / "vqkd_tiny.pt", data.image_shards, data.spm_path)
    out = work / "counts"
    from beit3.testing.jobs import REPO

    ds = json.loads((REPO / "ds_configs" / "zero3_bf16.json").read_text())
    ds["gradient_accumulation_steps"] = accum
    if fused:  # the optimizer a CUDA run gets (engine.choose_optimizer): torch's fused AdamW
        ds["optimizer"] = {"type": "AdamW", "params": {"fused": True}}
    (work / "ds.json").write_text(json.dumps(ds))
    args = overrides(data, tok, work / "run", **{"run.max_steps": steps, "run.log_every": 1000,
                                                  "run.save_every": 1000, "data.num_workers": 0})
    launch(2, args, ds_config=str(work / "ds.json"), script=Path(__file__).resolve(), env={OUT_ENV: str(out)})
    return [json.loads(Path(f"{out}.{r}").read_text()) for r in range(2)]



if __name__ == "__main__":
    rank_main(sys.argv[1:])
