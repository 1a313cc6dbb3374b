"""Fault injection for testing the run guards (a testing aid; inert unless the variable is set).

``BEIT3_INJECT_FAULT=KIND:step=N:rank=R[,KIND:step=N:rank=R...]`` makes rank ``R`` misbehave at
optimizer step ``N`` (1-based, the step being computed):

* ``nan``   -- that rank's loss is non-finite at step N (the divergence guard must skip the step);
* ``spike`` -- that rank's loss is 1000x at step N (a loss spike: the guard must roll back);
* ``stall`` -- that rank stops making progress at the start of step N (the hang watchdog must fire);
* ``exit``  -- that rank dies with SIGKILL at the start of step N (the supervisor must restart).

Each fault fires once per run directory: before firing, the rank appends it to
``output_dir/faults.jsonl``, and a relaunch (e.g. by ``beit3.runtime.supervise``) that reaches
step N again skips faults listed there. The ledger also gives the tests and ``bench/faults.py``
the wall time of each fault.
"""
from __future__ import annotations

import json
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

ENV = "BEIT3_INJECT_FAULT"
KINDS = ("nan", "spike", "stall", "exit")
LEDGER = "faults.jsonl"


@dataclass(frozen=True)
class Fault:
    kind: str
    step: int
    rank: int

    def key(self) -> tuple[str, int, int]:
        return (self.kind, self.step, self.rank)


def parse_faults(spec: str) -> list[Fault]:
    """``"nan:step=5:rank=1,exit:step=9:rank=0"`` -> faults; a malformed item raises ValueError."""
    faults = []
    for item in filter(None, (s.strip() for s in spec.split(","))):
        kind, *fields = item.split(":")
        values = dict(f.split("=", 1) for f in fields if "=" in f)
        ok = kind in KINDS and set(values) == {"step", "rank"} and len(fields) == 2
        if not ok or not all(v.isdigit() for v in values.values()):
            raise ValueError(f"{ENV}={spec!r}: {item!r} is not KIND:step=N:rank=R with KIND in {KINDS}")
        faults.append(Fault(kind, int(values["step"]), int(values["rank"])))
    return faults


class FaultInjector:
    """This rank's pending faults; every hook is a no-op when ``BEIT3_INJECT_FAULT`` is unset."""

    def __init__(self, output_dir: str, rank: int, spec: Optional[str] = None) -> None:
        spec = os.environ.get(ENV, "") if spec is None else spec
        self.rank = rank
        self.ledger = Path(output_dir) / LEDGER
        fired = {(r["kind"], r["step"], r["rank"]) for r in read_ledger(output_dir)}
        self.pending = [f for f in parse_faults(spec) if f.rank == rank and f.key() not in fired]

    def _take(self, kind: str, step: int) -> bool:
        for f in self.pending:
            if f.kind == kind and f.step == step:
                self.pending.remove(f)
                row = {"kind": kind, "step": step, "rank": self.rank, "time": time.time(), "pid": os.getpid()}
                with open(self.ledger, "a") as fh:  # durable before the fault, so a relaunch skips it
                    fh.write(json.dumps(row) + "\n")
                    fh.flush()
                    os.fsync(fh.fileno())
                return True
        return False

    def at_step_start(self, step: int) -> None:
        """``stall`` and ``exit`` faults of ``step`` (called before the step's first micro-batch)."""
        if not self.pending:
            return
        if self._take("exit", step):
            os.kill(os.getpid(), signal.SIGKILL)
        if self._take("stall", step):
            while True:  # stopped making progress; only the watchdog (or a signal) ends this
                time.sleep(3600)

    def corrupt_loss(self, loss: torch.Tensor, step: int) -> torch.Tensor:
        """The loss, made non-finite (``nan``) or 1000x (``spike``) if such a fault is due at ``step``."""
        if self.pending and self._take("nan", step):
            return loss * float("nan")
        if self.pending and self._take("spike", step):
            return loss * 1000.0
        return loss


def read_ledger(output_dir: str) -> list[dict]:
    """Faults fired so far under ``output_dir`` (oldest first)."""
    path = Path(output_dir) / LEDGER
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


__all__ = ["ENV", "Fault", "FaultInjector", "parse_faults", "read_ledger"]
