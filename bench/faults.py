"""Fault table and chaos run: 2 CPU ranks, tiny preset, under ``beit3.runtime.supervise``.

    .venv/bin/python bench/faults.py [--trainer pretrain|finetune|tokenizer] [--steps 16] [--repeats 1] [--chaos-steps 200]

``--trainer pretrain`` (ZeRO-3 bf16, the demo shards), ``finetune`` (classification, ZeRO-1 bf16,
the digits corpus; ``train.max_steps`` for ``run.max_steps``) or ``tokenizer`` (VQ-KD tiny,
ZeRO-1 fp32, digit images).

Each row runs a real 2-rank ``deepspeed`` job on the demo data with one fault and compares it
with an uninterrupted run of the same configuration in the same process:

- divergence: ``optim.lr=3`` (loss spikes from step 2) -> rollbacks, then exit 3 naming divergence;
- NaN loss on one rank (``BEIT3_INJECT_FAULT=nan``), a loss spike (``spike``) -> skip / rollback;
- stopped rank: SIGSTOP of rank 1 from outside -> watchdog exit 4, supervisor restart;
- stalled rank (``stall``), killed rank (``exit``: SIGKILL of one rank), killed job (SIGKILL of
  the launcher's process group from outside) -> supervisor restart.

Samples lost / repeated compare the global sample ids (pretraining: ``GlobalSampleSequence``, a
pure function of seed, source and position; fine-tuning: the rows of the epoch's
``DistributedSampler`` order at the step's position) of the data steps whose update reached the final weights with the
uninterrupted run's; "steps redone" counts step computations thrown away (replayed after a
restart or rollback); "detect" is the time from the fault to the job's exit (restart faults) or
"same step" when the guard discards the update before it is applied.

The chaos run: ``--chaos-steps`` steps with a random fault of the table every 15-30 steps; it
must finish, its losses must equal the uninterrupted run's up to the first step the guard
skipped, and it lists every skip and the time lost to faults. Results go to
``bench/results/faults.md``.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from beit3.data_pipeline.sequence import GlobalSampleSequence
from beit3.data_pipeline.shards import resolve_shards
from beit3.demo.data import build_demo_data
from beit3.runtime.faults import ENV, read_ledger
from beit3.runtime.ports import acquire_port, release
from beit3.testing.jobs import DEEPSPEED, REPO, launch_cmd, overrides, run_env
from beit3.testing.tokenizers import make_tokenizer

GLOBAL = {"image": 16, "text": 16, "pair": 16}  # overrides() batch sizes: 16 of each per step


def _rows(out: Path) -> tuple[list[dict], dict[int, dict]]:
    path = out / "metrics.jsonl"
    lines = [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []
    return lines, {r["step"]: r for r in lines}


class Job:
    """One (possibly supervised) 2-rank launch with injected and external faults."""

    def __init__(self, spec: "Spec", out: Path, steps: int, extra: dict, fault: str = "",
                 external: tuple = (), supervised: bool = True) -> None:
        self.out, self.steps, self.external = out, steps, list(external)
        self.port, self._port_lock = acquire_port()  # reserved (runtime.ports) until run() ends
        cmd = spec.command(out, self.port, {"run.max_steps": steps, **extra})
        if supervised:
            cmd = [sys.executable, "-m", "beit3.runtime.supervise", "--backoff", "1", "--max-restarts", "20",
                   "--summary", str(out / "summary.json"), "--", *cmd]
        self.cmd, self.env = cmd, {**run_env(), **({ENV: fault} if fault else {})}
        self.events: list[dict] = []

    def run(self) -> "Job":
        self.out.mkdir(parents=True, exist_ok=True)
        t0 = time.time()
        with open(self.out / "job.log", "w") as log:
            proc = subprocess.Popen(self.cmd, cwd=REPO, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True)
            try:
                while proc.poll() is None:
                    self._external(proc)
                    time.sleep(0.2)
            finally:
                release(self._port_lock)
        self.rc, self.wall = proc.returncode, time.time() - t0
        self.log = (self.out / "job.log").read_text()
        self.lines, self.final = _rows(self.out)
        return self

    def _external(self, proc: subprocess.Popen) -> None:
        """SIGSTOP a rank / SIGKILL the job once that rank's live heartbeat reaches the event's step."""
        for ev in list(self.external):
            kind, step, rank = ev
            try:
                hb = json.loads((self.out / "hang" / f"hb_rank{rank}.json").read_text())
            except (OSError, ValueError):
                continue
            if hb["step"] < step or time.time() - hb["alive"] > 3:
                continue
            if kind == "sigstop":
                os.kill(hb["pid"], signal.SIGSTOP)
            else:  # killjob: the launcher's process group (the supervisor's child)
                import psutil

                for child in psutil.Process(proc.pid).children():
                    os.killpg(child.pid, signal.SIGKILL)
            self.events.append({"kind": kind, "step": hb["step"], "rank": rank, "time": time.time()})
            self.external.remove(ev)

    # ---- figures ---------------------------------------------------------------------------------
    def faults(self) -> list[dict]:
        return sorted(read_ledger(str(self.out)) + self.events, key=lambda f: f["time"])

    def windows(self) -> list[tuple[int, int]]:
        import re

        return [(int(a), int(b)) for a, b in re.findall(r"\[rank0\].*data steps (\d+)-(\d+) will be skipped", self.log)]

    def applied_steps(self) -> list[int]:
        skipped = {s for lo, hi in self.windows() for s in range(lo, hi + 1)}
        return [s for s, r in sorted(self.final.items()) if r.get("applied", 1) and s not in skipped]

    def attempts(self) -> list[dict]:
        path = self.out / "summary.json"
        return json.loads(path.read_text())["attempts"] if path.exists() else []

    def detect_s(self) -> list[str]:
        """Per fault: seconds from the fault to the end of the attempt it ended (or "same step")."""
        ends = [a["start"] + a["seconds"] for a in self.attempts()]
        out = []
        for f in self.faults():
            if f["kind"] in ("nan", "spike"):
                out.append("same step")
            else:
                end = min((e for e in ends if e >= f["time"]), default=None)
                out.append(f"{end - f['time']:.1f} s" if end else "-")
        return out


class Spec:
    """One trainer's launch command, run fields and sample ids."""

    name, ds_json = "", ""
    fields: dict[str, str] = {}  # the run's field -> this trainer's name for it

    def command(self, out: Path, port: int, extra: dict) -> list[str]:
        return self.launch(out, port, {self.fields.get(k, k): v for k, v in extra.items()})

    def launch(self, out: Path, port: int, extra: dict) -> list[str]:
        raise NotImplementedError

    def sample_ids(self, steps: list[int]) -> Counter:
        raise NotImplementedError


class PretrainSpec(Spec):
    name, ds_json = "pretrain", "ZeRO-3 bf16, demo shards"

    def __init__(self, root: Path) -> None:
        self.data = build_demo_data(root / "data", num_train=400, spm_vocab=400, samples_per_shard=100, max_docs=80)
        self.tok = make_tokenizer(root / "vqkd_tiny.pt", self.data.image_shards, self.data.spm_path)

    def launch(self, out: Path, port: int, extra: dict) -> list[str]:
        return launch_cmd(2, port, overrides(self.data, self.tok, out, **extra))

    def sample_ids(self, steps: list[int]) -> Counter:
        """Global sample ids of data steps ``steps`` (1-based), every source."""
        seqs = {}
        for src, spec in (("image", self.data.image_shards), ("text", self.data.text_shards),
                          ("pair", self.data.pair_shards)):
            shards = resolve_shards([spec], src)
            seqs[src] = GlobalSampleSequence(shards.counts, 0, src, 16)
        ids: Counter = Counter()
        for s in steps:
            for src, count in GLOBAL.items():
                for pos in range((s - 1) * count, s * count):
                    ids[(src, seqs[src].locate(pos, None)[2])] += 1
        return ids


class FinetuneSpec(Spec):
    """Classification of the digits corpus' colours: 180 rows, 8 per rank and step (11 steps per epoch)."""

    name, ds_json = "finetune", "ZeRO-1 bf16, classification of the digits corpus"
    fields = {"run.max_steps": "train.max_steps"}
    MICRO = 8

    def __init__(self, root: Path) -> None:
        from beit3.data_pipeline.tokenizer import TextTokenizer
        from beit3.demo.finetune_data import convert_corpus, make_digits_corpus

        self.corpus = make_digits_corpus(root / "digits", n=240)
        self.index = convert_corpus(self.corpus) / "colors.train.jsonl"
        self.rows = len(self.index.read_text().splitlines())
        self.vocab = TextTokenizer(str(self.corpus.spm)).vocab_size

    def launch(self, out: Path, port: int, extra: dict) -> list[str]:
        items = {"data.data_root": self.corpus.root, "data.spm": self.corpus.spm, "model.preset": "tiny",
                 "model.overrides.vocab_size": self.vocab, "data.batch_size": self.MICRO, "data.num_workers": 0,
                 "data.train_index": self.index, "data.classes": self.corpus.color_classes,
                 "run.deepspeed_config": "zero1_bf16.json", "run.output_dir": out, "run.log_every": 1,
                 "run.save_every_epochs": 1000, "run.resume": "auto", "optim.lr": 1e-3, **extra}
        return [str(DEEPSPEED), "--num_gpus", "2", "--master_port", str(port), "--module",
                "beit3.finetune.train", "classification", *[f"{k}={v}" for k, v in items.items()]]

    def sample_ids(self, steps: list[int]) -> Counter:
        """Row indices of data steps ``steps``: the epoch's sampler order of each rank at the step."""
        from torch.utils.data import DistributedSampler

        per_epoch = self.rows // (2 * self.MICRO)
        ids: Counter = Counter()
        for s in steps:
            epoch, done = divmod(s - 1, per_epoch)
            for rank in (0, 1):
                sampler = DistributedSampler(range(self.rows), num_replicas=2, rank=rank, shuffle=True, seed=0,
                                             drop_last=True)
                sampler.set_epoch(epoch)
                ids.update(list(sampler)[done * self.MICRO:(done + 1) * self.MICRO])
        return ids


def row(name: str, job: Job, ref_steps: int, spec: Spec) -> dict:
    ref = spec.sample_ids(list(range(1, ref_steps + 1)))
    got = spec.sample_ids(job.applied_steps())
    reason = next((ln.strip() for ln in job.log.splitlines() if ln.startswith(("diverged:", "hang:"))), "")
    finished = job.rc == 0 and max(job.final, default=0) == ref_steps
    diverged = reason.startswith("diverged:")
    return {"fault": name, "outcome": "finished" if finished else f"exit {job.rc}: {reason[:90]}",
            "restarts": max(len(job.attempts()) - 1, 0), "redone": len(job.lines) - len(job.final),
            "not_applied": ref_steps - len(job.applied_steps()) if finished else "-",
            "lost": sum((ref - got).values()) if finished else "-",
            "repeated": sum((got - ref).values()) if finished else "-",
            "detect": "same step (each spike)" if diverged else ", ".join(job.detect_s()) or "-", "wall": job.wall}


def scenarios(steps: int) -> list[tuple[str, dict, str, tuple]]:
    """(name, overrides, BEIT3_INJECT_FAULT, external events) of the table rows."""
    k = steps // 2 - 1  # the fault step: after the first checkpoint, before the second
    hang: dict = {}
    return [
        ("divergence (optim.lr=3)", {"optim.lr": 3, "optim.warmup_steps": 4, "run.save_every": 1, "guard.spike_factor": 3,
                                     "guard.spike_warmup_steps": 1, "guard.max_rollbacks": 2}, "", ()),
        (f"NaN loss on rank 1 only (step {k})", {}, f"nan:step={k}:rank=1", ()),
        (f"loss spike x1000 on rank 0 (step {k + 2})", {"guard.spike_warmup_steps": 3, "guard.spike_factor": 3},
         f"spike:step={k + 2}:rank=0", ()),
        (f"stopped rank (SIGSTOP rank 1, step {k})", hang, "", (("sigstop", k, 1),)),
        (f"stalled rank (stall rank 0, step {k})", hang, f"stall:step={k}:rank=0", ()),
        (f"killed rank (SIGKILL rank 1, step {k})", {}, f"exit:step={k}:rank=1", ()),
        (f"killed job (SIGKILL of the launcher, step {k})", {}, "", (("killjob", k, 0),)),
    ]


def chaos_schedule(steps: int, seed: int) -> tuple[str, list[tuple]]:
    rng, step, injected, external = random.Random(seed), 0, [], []
    while True:
        step += rng.randint(15, 30)
        if step > steps - 5:
            return ",".join(injected), external
        kind, rank = rng.choice(["nan", "spike", "stall", "exit", "sigstop", "killjob"]), rng.randint(0, 1)
        if kind in ("sigstop", "killjob"):
            external.append((kind, step, rank))
        else:
            injected.append(f"{kind}:step={step}:rank={rank}")


def first_unapplied(job: Job) -> int:
    applied = set(job.applied_steps())
    return min((s for s in range(1, max(job.final, default=0) + 1) if s not in applied), default=10 ** 9)


def equal_until_skip(job: Job, ref: dict[int, dict]) -> bool:
    first = first_unapplied(job)
    return all(job.final.get(s, {}).get("loss") == ref[s]["loss"] for s in ref if s < first)


class TokenizerSpec(Spec):
    """VQ-KD tiny on 256 digit images (32 px, a random tiny CLIP teacher): 8 images per rank and step."""

    name, ds_json = "tokenizer", "ZeRO-1 fp32, VQ-KD tiny on digit images"
    fields = {"run.max_steps": "optim.total_steps"}
    MICRO = 8

    def __init__(self, root: Path) -> None:
        import torch

        from beit3.data_pipeline import write_images
        from beit3.demo.digits import write_digits_image_folder
        from beit3.model.vqkd import ClipVisionTeacher

        write_digits_image_folder(root / "digits", size=32, limit=256)
        write_images.main([str(root / "digits"), str(root / "shards"), "-q", "--maxcount", "100"])
        self.manifest, self.teacher = root / "shards" / "manifest.json", root / "teacher.pt"
        torch.manual_seed(0)
        torch.save(ClipVisionTeacher(32, 8, 64, 2, 1, 64).state_dict(), self.teacher)

    def launch(self, out: Path, port: int, extra: dict) -> list[str]:
        items = {"preset": "tiny", "teacher.path": self.teacher, "data.image_shards": f"[{self.manifest}]",
                 "data.img_size": 32, "data.patch_size": 8, "data.num_workers": 0, "run.output_dir": out,
                 "run.batch_size": self.MICRO, "run.deepspeed_config": "zero1_fp32.json", "run.log_every": 1,
                 "optim.warmup_steps": 1, "optim.lr": 1e-3, **extra}
        return [str(DEEPSPEED), "--num_gpus", "2", "--master_port", str(port), "--module",
                "beit3.pretrain.train_vqkd", *[f"{k}={v}" for k, v in items.items()]]

    def sample_ids(self, steps: list[int]) -> Counter:
        """Global image sample ids of data steps ``steps``."""
        seq = GlobalSampleSequence(resolve_shards([str(self.manifest)], "image").counts, 0, "image", 16)
        per_step = 2 * self.MICRO
        return Counter(seq.locate(pos, None)[2] for s in steps for pos in range((s - 1) * per_step, s * per_step))


SPECS = {"pretrain": PretrainSpec, "finetune": FinetuneSpec, "tokenizer": TokenizerSpec}


def table(rows: list[dict]) -> list[str]:
    out = ["| fault | tried | outcome | restarts | steps redone | steps not applied | samples lost | "
           "samples repeated | losses = uninterrupted until first skip | time to detect | wall s (ratio) |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['fault']} | {r['tried']} | {r['outcome']} | {r['restarts']} | {r['redone']} | "
                   f"{r['not_applied']} | {r['lost']} | {r['repeated']} | {r['equal']} | {r['detect']} | "
                   f"{r['wall']:.0f} ({r['ratio']:.2f}x) |")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trainer", choices=("pretrain", "finetune", "tokenizer"), default="pretrain")
    p.add_argument("--steps", type=int, default=16, help="steps of each table run")
    p.add_argument("--repeats", type=int, default=1, help="times each row is tried")
    p.add_argument("--chaos-steps", type=int, default=200, help="0: no chaos run")
    p.add_argument("--seed", type=int, default=0, help="chaos schedule seed")
    p.add_argument("--only", help="run only table rows whose name contains this")
    p.add_argument("--out", help="default bench/results/faults.md (pretrain), faults_<trainer>.md")
    args = p.parse_args(argv)
    args.out = args.out or str(REPO / "bench" / "results" / ("faults.md" if args.trainer == "pretrain"
                                                             else f"faults_{args.trainer}.md"))
    base = {"run.save_every": args.steps // 4, "optim.warmup_steps": 2, "run.keep_last": 2, "run.dist_timeout_s": 20}
    lines = ["# Fault table and chaos run", "", f"`{' '.join(['.venv/bin/python bench/faults.py', *(argv or sys.argv[1:])])}`"
             f" -- {args.trainer}: 2 CPU ranks (gloo), tiny preset, {SPECS[args.trainer].ds_json}, every run under "
             "`python -m beit3.runtime.supervise --backoff 1`; ratios against the uninterrupted run of the same "
             "length in the same process.", ""]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        spec = SPECS[args.trainer](root)
        ref = Job(spec, root / "ref", args.steps, base, supervised=False).run()
        assert ref.rc == 0, ref.log[-3000:]
        rows = []
        for i, (name, extra, fault, external) in enumerate(scenarios(args.steps)):
            if args.only and args.only not in name:
                continue
            results = []
            for rep in range(args.repeats):
                job = Job(spec, root / f"row{i}_{rep}", args.steps, {**base, **extra}, fault, external).run()
                equal = ("yes" if equal_until_skip(job, ref.final) else "NO") if not extra.get("optim.lr") else "n/a"
                results.append(row(name, job, args.steps, spec) | {"equal": equal, "ratio": job.wall / ref.wall})
                print(results[-1], flush=True)
            outcomes = Counter(r["outcome"] for r in results)
            rows.append({**results[-1], "tried": args.repeats,
                         "outcome": "; ".join(f"{o} ({n}/{args.repeats})" for o, n in outcomes.items())})
        lines += [f"## Fault table ({args.steps} steps per run; uninterrupted: {ref.wall:.0f} s)", "", *table(rows), ""]
        if args.chaos_steps:
            lines += chaos(spec, root, args.chaos_steps, args.seed, base)
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


def chaos(spec: Spec, root: Path, steps: int, seed: int, base: dict) -> list[str]:
    cfg = {**base, "run.save_every": 10, "guard.spike_warmup_steps": 5, "guard.spike_factor": 3}
    ref = Job(spec, root / "chaos_ref", steps, cfg, supervised=False).run()
    fault, external = chaos_schedule(steps, seed)
    job = Job(spec, root / "chaos", steps, cfg, fault, external).run()
    first = first_unapplied(job)
    r = row("chaos", job, steps, spec)
    skipped = [s for s in range(1, steps + 1) if s not in set(job.applied_steps())]
    out = [f"## Chaos run ({steps} steps, seed {seed}, a random fault every 15-30 steps)", "",
           "- faults (in order): " + ", ".join(f"{f['kind']}@step{f['step']}/rank{f['rank']}" for f in job.faults()),
           f"- outcome: {r['outcome']} after {r['restarts']} restart(s); exit codes "
           f"{[a['exit_code'] for a in job.attempts()]}",
           f"- losses equal to the uninterrupted run's up to the first skipped step "
           f"({first if first < 10 ** 9 else 'none: every step applied'}): "
           f"{'yes' if equal_until_skip(job, ref.final) else 'NO'}",
           f"- steps whose update was not applied (every skip): {skipped}; rollback windows {job.windows()}",
           f"- samples lost {r['lost']}, repeated {r['repeated']} (global sample ids vs the uninterrupted run); "
           f"step computations redone {r['redone']}",
           f"- time to detect per fault: {r['detect']}",
           f"- wall {job.wall:.0f} s vs uninterrupted {ref.wall:.0f} s: {job.wall - ref.wall:.0f} s lost to faults "
           f"({job.wall / ref.wall:.2f}x)", ""]
    return out


if __name__ == "__main__":
    sys.exit(main())
