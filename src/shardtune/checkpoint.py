"""Run folders, checkpoints (atomic, resumable) and the export to HF format.

A checkpoint is `checkpoints/step-NNNNNNNN/`: the strategy's model and optimizer
state (`dcp/`: torch.distributed.checkpoint shards for DDP and FSDP2; `zero/`:
DeepSpeed's per-rank shards), `rng-<rank>.safetensors` per rank,
`trainer_state.json` (state.py: counters, every rank's data position, LR
schedule, best eval, W&B run id, layout, config) and `manifest.json` (every
file and its size), written last. It
is built under a temporary name and renamed into place; `checkpoints/latest`
names the newest and is replaced atomically after the rename. A checkpoint
whose manifest is missing or does not match its files is incomplete and is
skipped with a warning.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import yaml

from shardtune import ShardtuneError, storage
from shardtune.config import Config
from shardtune.jsonfile import write_json
from shardtune.state import TrainerState
from shardtune.tracking import redact

MODEL_DIR = "model"
METRICS_FILE = "metrics.json"
CONFIG_FILE = "config.yaml"
LABELS_FILE = "label_map.json"
CKPT_DIR = "checkpoints"
MANIFEST = "manifest.json"


def has_checkpoints(run_dir: Path) -> bool:
    return any((run_dir / CKPT_DIR).glob("step-*"))


def slurm_job(env: Mapping[str, str] = os.environ) -> tuple[str, int] | None:
    """Inside a Slurm job: its name for run folders and W&B, `slurm-<cluster>-<job id>` (an array task:
    `<array job id>_<task id>`, the same as WANDB_RUN_ID in slurm/*.sbatch), and how often it was requeued
    (a requeued job keeps its id, so it finds its folder again). None outside Slurm."""
    job = env.get("SLURM_JOB_ID")
    if not job:
        return None
    if env.get("SLURM_ARRAY_JOB_ID") and env.get("SLURM_ARRAY_TASK_ID"):
        job = f"{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"
    return f"slurm-{env.get('SLURM_CLUSTER_NAME') or 'cluster'}-{job}", int(env.get("SLURM_RESTART_COUNT") or 0)


def choose_run_dir(cfg: Config, config_name: str) -> Path:
    """The run folder: output.dir; else, inside a Slurm job, runs/<config name>-slurm-<cluster>-<job id>, so that every
    requeue of the job resumes there; else runs/<config name>-<timestamp>. Refuses to clobber a used folder."""
    if cfg.output.dir and storage.is_url(cfg.output.dir):
        return _store_run_dir(cfg)
    job = None if cfg.output.dir else slurm_job()
    if cfg.output.dir:
        path = Path(cfg.output.dir).expanduser()
    elif job:
        path = Path("runs") / f"{config_name}-{job[0]}"
    else:
        path = Path("runs") / f"{config_name}-{time.strftime('%Y%m%d-%H%M%S')}"
    if not (path.exists() and any(path.iterdir())) or cfg.output.overwrite:
        return path
    if job and not job[1]:
        raise ShardtuneError(
            f"run folder {path} is named after Slurm job {job[0]}, which has not been requeued, but already holds a run "
            "(a second run in one allocation, or job ids reused); set output.dir for this run (or output.overwrite=true)."
        )
    if job or (cfg.train.resume != "never" and has_checkpoints(path)):
        return path  # resume there (a requeued job that saved no checkpoint yet starts over in its own folder)
    raise ShardtuneError(f"run folder {path} is not empty; choose another output.dir or set output.overwrite=true.")


def _store_run_dir(cfg: Config) -> Path:
    """The local staging folder of a run whose output.dir is an object-store URL; refuses a used URL as a used folder."""
    from shardtune.run_store import RunStore, staging_for

    store = RunStore(cfg.output.dir)
    if store.has_run() and not cfg.output.overwrite and not slurm_job() and not (cfg.train.resume != "never" and store.sealed()):
        raise ShardtuneError(f"run folder {store} is not empty; choose another output.dir or set output.overwrite=true.")
    return Path(cfg.output.staging).expanduser() if cfg.output.staging else staging_for(cfg.output.dir)


def save_config(run_dir: Path, cfg: Config) -> None:
    """The resolved config, secrets redacted; `shardtune train RUN/config.yaml` reruns it."""
    (run_dir / CONFIG_FILE).write_text(yaml.safe_dump(redact(cfg.to_dict()), sort_keys=False))


# ---------------------------------------------------------------- checkpoints


def _files(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_size for p in sorted(root.rglob("*")) if p.is_file() and p.name != MANIFEST}


def step_dir(run_dir: Path, step: int) -> Path:
    return run_dir / CKPT_DIR / f"step-{step:08d}"


@dataclass
class PendingSave:
    """A checkpoint whose files are being written (async) and which is not sealed yet."""

    step: int
    tmp: Path
    final: Path
    files: Any  # a Future of the files this rank wrote (model and optimizer shards)
    rng_file: Path
    state: Any  # the TrainerState of that step, written at the seal
    keep: int
    best_step: int | None
    upload: Any = None  # a Future of this rank's seal entries, when the run folder is on object storage (run_store.py)

    def done(self) -> bool:
        return self.files.done() and (self.upload is None or self.upload.done())


def begin_checkpoint(strategy, run_dir: Path, step: int, state, keep: int, best_step: int | None = None,
                     asynchronous: bool = False, store=None) -> PendingSave:
    """Every rank starts writing its part into a temporary folder: model and optimizer (in the background when
    `asynchronous` and the backend can), and its RNG state; with a `store` (run_store.RunStore), then uploads
    them in the upload thread. Collective."""
    from shardtune import failpoints
    from shardtune.distributed import rng
    from shardtune.distributed.base import completed

    root = run_dir / CKPT_DIR
    final, tmp = step_dir(run_dir, step), root / f".tmp-step-{step:08d}"
    if strategy.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
    strategy.barrier()
    tmp.mkdir(parents=True, exist_ok=True)  # by every rank: the staging folder of a store-backed run may be node-local
    files = strategy.save_async(tmp) if asynchronous else completed(strategy.save(tmp))
    pending = PendingSave(step, tmp, final, files, rng.save(tmp, strategy.rank), state, keep, best_step)
    if store is not None:
        pending.upload = store.upload_later(files, [pending.rng_file], tmp, final.name)
    failpoints.hit("save", strategy.rank, step)
    return pending


def seal_checkpoint(strategy, run_dir: Path, pending: PendingSave, store=None) -> Path:
    """Once every rank's files are written: each rank fsyncs the files it wrote; the main rank writes the trainer
    state and the manifest, renames the folder into place and moves `latest`; only the newest `keep` checkpoints stay,
    plus the one at `best_step` (the best eval) when there is one. With a `store`, once every rank's upload is done
    the main rank uploads the rest and the seal, and prunes the store alike. Collective."""
    for path in [*pending.files.result(), pending.rng_file]:  # on disk, not only in the page cache, before the seal
        _fsync(path)
    entries = _uploaded(strategy, pending) if store is not None else {}
    strategy.barrier()
    root = run_dir / CKPT_DIR
    error = None
    if strategy.is_main:
        pending.state.write(pending.tmp)
        write_json(pending.tmp / MANIFEST, _files(pending.tmp))
        shutil.rmtree(pending.final, ignore_errors=True)
        os.replace(pending.tmp, pending.final)
        _fsync(root)
        _write_latest(root, pending.final.name)
        best = step_dir(run_dir, pending.best_step).name if pending.best_step else None
        for old in sorted(root.glob("step-*"))[: -pending.keep]:
            if old.name != best:
                shutil.rmtree(old, ignore_errors=True)
        if store is not None:
            error = _store_seal(store, pending.final, entries, pending.keep, best)
    error = strategy.from_main(error) if store is not None else None
    if error:
        raise ShardtuneError(error)
    strategy.barrier()
    return pending.final


def _uploaded(strategy, pending: PendingSave) -> dict:
    """Every rank's seal entries, merged (every rank's upload done); an upload error is every rank's. Collective."""
    try:
        mine = pending.upload.result()
    except ShardtuneError as exc:
        mine = str(exc)
    everyone = strategy.gather_objects(mine)
    failed = [e for e in everyone if isinstance(e, str)]
    if failed:
        raise ShardtuneError(failed[0])
    return {k: v for entries in everyone for k, v in entries.items()}


def _store_seal(store, final: Path, entries: dict, keep: int, best: str | None) -> str | None:
    """The main rank's part of sealing in the store; the error's sentence, or None."""
    try:
        store.seal(final, final.name, entries)
        store.prune(keep, best)
    except ShardtuneError as exc:
        return str(exc)
    return None


def save_checkpoint(strategy, run_dir: Path, step: int, state, keep: int, best_step: int | None = None, store=None) -> Path:
    """A checkpoint written and sealed now (see begin_checkpoint and seal_checkpoint). Collective."""
    return seal_checkpoint(strategy, run_dir, begin_checkpoint(strategy, run_dir, step, state, keep, best_step, store=store), store)


def _write_latest(root: Path, name: str) -> None:
    tmp = root / ".latest.tmp"
    with open(tmp, "w") as f:
        f.write(name + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, root / "latest")
    _fsync(root)


def _fsync(path: Path) -> None:
    """Flush a file, or a folder (a rename is durable once its folder is synced)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _read_latest(root: Path) -> str | None:
    """The name `latest` holds, or None (with a warning) when it is missing or torn."""
    pointer = root / "latest"
    name = pointer.read_text(errors="replace").strip() if pointer.is_file() else ""
    if not (name.startswith("step-") and (root / name).is_dir()):
        why = "is missing" if not pointer.is_file() else f"names {name!r}, not a checkpoint here"
        warnings.warn(f"checkpoint pointer {pointer} {why}; taking the newest complete checkpoint instead", stacklevel=3)
        return None
    return name


def check_checkpoint(path: Path) -> str | None:
    """None when complete, else why not."""
    manifest = path / MANIFEST
    if not manifest.is_file():
        return "no manifest (the write did not finish)"
    try:
        expected = json.loads(manifest.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return "unreadable manifest"
    actual = _files(path)
    for name, size in expected.items():
        if name not in actual:
            return f"{name} is missing"
        if actual[name] != size:
            return f"{name} has {actual[name]} bytes, not {size}"
    return None


def find_checkpoint(run_dir: Path, resume: str, before: int | None = None) -> Path | None:
    """The checkpoint to resume from: auto = the one `latest` names, else the newest complete one in run_dir
    (torn ones, and a missing or torn pointer, are skipped with a warning); `before`: only steps <= it."""
    if resume == "never":
        return None
    if resume != "auto":
        path = Path(resume).expanduser()
        why = check_checkpoint(path) if path.is_dir() else "no such folder"
        if why:
            raise ShardtuneError(f"cannot resume from {path}: {why}; pass a complete checkpoint folder or train.resume=auto.")
        return path
    root = run_dir / CKPT_DIR
    candidates = sorted(root.glob("step-*"), reverse=True)
    if before is not None:
        candidates = [p for p in candidates if int(p.name.split("-")[1]) <= before]
    latest = _read_latest(root) if candidates else None
    if latest in {p.name for p in candidates}:  # the pointer is the commit record: it wins over a newer unpointed folder
        candidates.sort(key=lambda p: p.name != latest)
    for path in candidates:
        why = check_checkpoint(path)
        if why is None:
            return path
        warnings.warn(f"skipping incomplete checkpoint {path}: {why}", stacklevel=2)
    return None


def resume_point(strategy, cfg: Config, run_dir: Path, store) -> Path | None:
    """The local checkpoint folder to resume from: found in run_dir, or, from a store (the run's own, or a
    train.resume URL), the newest sealed one fetched and checked against its seal (run_store.py). Collective."""
    resume = cfg.train.resume
    if store is None and not storage.is_url(resume):
        return strategy.from_main(find_checkpoint(run_dir, resume) if strategy.is_main else None)
    found = None
    if strategy.is_main:
        try:
            found = str(_fetch_resume(resume, run_dir, store) or "")
        except ShardtuneError as exc:
            found = ShardtuneError(str(exc))
    found = strategy.from_main(found)
    if isinstance(found, ShardtuneError):
        raise found
    if found and not Path(found).is_dir() and os.environ.get("LOCAL_RANK", "0") == "0":  # node-local staging
        _fetch_resume(resume, run_dir, store)
    strategy.barrier()
    return Path(found) if found else None


def _fetch_resume(resume: str, run_dir: Path, store) -> Path | None:
    from shardtune.run_store import RunStore

    if resume == "never":
        return None
    if storage.is_url(resume):
        run_url, _, name = resume.rstrip("/").rpartition(f"/{CKPT_DIR}/")
        if not (run_url and name.startswith("step-")):
            raise ShardtuneError(f"train.resume={storage.display(resume)} is not a checkpoint URL; give RUN_URL/{CKPT_DIR}/step-N or auto.")
        return RunStore(run_url).fetch(name, run_dir / ".fetched" / name)
    if resume != "auto":
        return find_checkpoint(run_dir, resume)
    name = store.newest()
    return store.fetch(name, run_dir / CKPT_DIR / name) if name else None


def read_state(path: Path) -> TrainerState:
    """The checkpoint's TrainerState (state.py)."""
    return TrainerState.read(path)


# ---------------------------------------------------------------- export


def export_model(strategy, tokenizer, labels: list[str] | None, out: Path) -> None:
    """HF folder: safetensors weights (sharded when big), tokenizer, label map; replaced atomically. Collective.

    A LoRA (PEFT) model is written merged, as a plain HF folder, or as PEFT's adapter folder (model.lora.merge);
    the merge happens on a copy, so training can go on after an eval's export.
    """
    from shardtune.models import is_peft, save_lora

    state = strategy.full_state_dict()
    if strategy.is_main:
        tmp = out.with_name(f".{out.name}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        unwrapped = strategy.unwrapped()
        if is_peft(unwrapped):
            save_lora(unwrapped, tmp, state)
        else:
            unwrapped.save_pretrained(tmp, state_dict=state, safe_serialization=True, max_shard_size="2GB")
        tokenizer.save_pretrained(tmp)
        if labels:
            write_json(tmp / LABELS_FILE, {"id2label": dict(enumerate(labels))})
        shutil.rmtree(out, ignore_errors=True)
        os.replace(tmp, out)
    strategy.barrier()
