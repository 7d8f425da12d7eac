"""A run folder on object storage (`output.dir: s3://bucket/runs/x`): checkpoints uploaded and sealed, found,
fetched and verified; the exported model and the run's small files mirrored.

The run works in a local folder (`output.staging`; node-local scratch on a cluster) exactly as a local run
does, and the store receives what must outlive the node:

    URL/config.yaml, URL/metrics.json            the run's files (at start, at the end)
    URL/model/...                                the best (or final) model, after each export
    URL/checkpoints/step-NNNNNNNN/<files>        every rank uploads the files it wrote, off the training thread
    URL/checkpoints/step-NNNNNNNN/sealed.json    the seal: every file's size and sha256, written last

A store has no rename, so a checkpoint counts only once its `sealed.json` exists (written by the main rank after
every rank's upload is done); a checkpoint without it is skipped with a warning, and pruning deletes the seal
first. Resuming downloads the newest sealed checkpoint into the staging folder and checks every file's size and
hash against the seal *before* anything in it is loaded: DCP's `.metadata` and DeepSpeed's `.pt` files are
pickles, and a bucket is shared ground, so a file replaced after sealing (another writer, a tampered object) is
refused in one sentence. What is trusted is the seal itself: whoever can write to the bucket can write a seal,
so give write access to the runs you trust only (docs/architecture.md).

Hand-written because torch's FsspecWriter writes DCP shards straight to the store but not the content hashes a
seal needs (they would have to be read back), and DeepSpeed writes only to local paths: one path, stage locally
then upload, serves both formats.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Optional

from shardtune import ShardtuneError, failpoints, storage
from shardtune.distributed import comm

SEAL = "sealed.json"
CKPT_DIR = "checkpoints"
_UPLOADS = ThreadPoolExecutor(max_workers=1, thread_name_prefix="shardtune-upload")


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def staging_for(url: str) -> Path:
    """The default local folder of a run at `url`: .staging/<host>/<path> under the working directory."""
    return Path(".staging") / storage.URL.sub("", storage.display(url)).strip("/")


class RunStore:
    def __init__(self, url: str):
        self.url = url.rstrip("/")

    def __repr__(self) -> str:
        return storage.display(self.url)

    def ckpt_url(self, name: str) -> str:
        return storage.join(self.url, CKPT_DIR, name)

    # ---------------------------------------------------------------- writing
    def upload(self, folder: Path, files: list[Path], name: str) -> dict[str, dict]:
        """This rank's files of checkpoint `name` (paths inside `folder`) -> their seal entries."""
        entries = {}
        for path in files:
            rel = Path(path).relative_to(folder).as_posix()
            entries[rel] = {"size": Path(path).stat().st_size, "sha256": sha256(Path(path))}
            storage.put_file(str(path), storage.join(self.ckpt_url(name), rel))
            failpoints.hit("upload", comm.rank(), int(name.split("-")[1]))  # tests: a rank killed mid-upload
        return entries

    def upload_later(self, files: Future, extra: list[Path], folder: Path, name: str) -> Future:
        """Upload this rank's files once `files` (a Future of them) is done, and `extra`, in the upload thread."""
        return _UPLOADS.submit(lambda: self.upload(folder, [*files.result(), *extra], name))

    def seal(self, folder: Path, name: str, entries: dict[str, dict]) -> None:
        """Main rank, every rank's upload done: upload the files no rank claimed (metadata, trainer state, manifest),
        then the seal, last."""
        claimed = set(entries)
        rest = [p for p in sorted(folder.rglob("*")) if p.is_file() and p.relative_to(folder).as_posix() not in claimed]
        entries = {**entries, **self.upload(folder, rest, name)}
        body = json.dumps({"version": 1, "checkpoint": name, "files": entries}, indent=1, sort_keys=True).encode()
        storage.put_bytes(storage.join(self.ckpt_url(name), SEAL), body)

    def prune(self, keep: int, best: Optional[str]) -> None:
        """Keep the newest `keep` sealed checkpoints and `best`; delete the others, each seal first (a half-deleted
        checkpoint is unsealed, not damaged), and the unsealed leftovers of uploads that died before the newest seal."""
        names = self._steps()
        sealed = [n for n in names if self._is_sealed(n)]
        for name in names:
            if (name in sealed[keep:] and name != best) or (name not in sealed and sealed and name < sealed[0]):
                storage.remove(storage.join(self.ckpt_url(name), SEAL))
                storage.remove(self.ckpt_url(name))

    def put_folder(self, folder: Path, name: str) -> None:
        """A local folder (an exported model) to URL/name, replacing what was there."""
        put_folder(folder, storage.join(self.url, name))

    def get_folder(self, name: str, dest: Path) -> None:
        """URL/name (an exported model: safetensors and JSON, nothing unpickled) into the local folder `dest`."""
        for url, _ in storage.listing(storage.join(self.url, name) + "/", fresh=True):
            storage.download(url, str(dest / url[len(storage.join(self.url, name)) + 1:]))

    def put_file(self, path: Path) -> None:
        storage.put_file(str(path), storage.join(self.url, Path(path).name))

    # ---------------------------------------------------------------- reading
    def has_run(self) -> bool:
        return bool(storage.subfolders(self.url))

    def _steps(self) -> list[str]:
        """The checkpoint folders in the store, newest first."""
        return sorted((n for n in storage.subfolders(storage.join(self.url, CKPT_DIR)) if n.startswith("step-")), reverse=True)

    def _is_sealed(self, name: str) -> bool:
        return storage.exists(storage.join(self.ckpt_url(name), SEAL))

    def sealed(self) -> list[str]:
        """Names of the checkpoints with a seal, newest first."""
        return [n for n in self._steps() if self._is_sealed(n)]

    def newest(self, before: Optional[int] = None) -> Optional[str]:
        """The newest sealed checkpoint (at step <= before); newer unsealed ones are skipped with a warning."""
        for name in self._steps():
            if before is not None and int(name.split("-")[1]) > before:
                continue
            if self._is_sealed(name):
                return name
            warnings.warn(f"skipping unsealed checkpoint {storage.display(self.ckpt_url(name))}: its upload did not finish", stacklevel=2)
        return None

    def fetch(self, name: str, dest: Path) -> Path:
        """Checkpoint `name` in `dest` (downloaded where the local copy differs), every file checked against the seal."""
        url = self.ckpt_url(name)
        seal = json.loads(storage.read_bytes(storage.join(url, SEAL)))
        files = seal.get("files") if isinstance(seal, dict) else None
        if not isinstance(files, dict) or not files:
            raise ShardtuneError(f"checkpoint {storage.display(url)} has an unreadable seal ({SEAL}); resume from another checkpoint or set train.resume=never.")
        listed = dict(storage.listing(url + "/", fresh=True))
        for rel, entry in files.items():
            path = dest / rel
            if not (path.is_file() and path.stat().st_size == entry["size"] and sha256(path) == entry["sha256"]):
                if listed.get(storage.join(url, rel)) != entry["size"]:
                    _refuse(url, rel, "is missing or has another size than sealed")
                storage.download(storage.join(url, rel), str(path))
                if sha256(path) != entry["sha256"]:
                    os.remove(path)
                    _refuse(url, rel, "has other content than sealed")
        return dest


def put_folder(folder: Path, url: str) -> None:
    """A local folder to `url`, replacing what was there."""
    storage.remove(url)
    for path in sorted(Path(folder).rglob("*")):
        if path.is_file():
            storage.put_file(str(path), storage.join(url, path.relative_to(folder).as_posix()))


def fetch_checkpoint(url: str, dest: Path) -> Path:
    """A checkpoint in a store (RUN_URL/checkpoints/step-N, or RUN_URL: its newest sealed one), fetched and checked."""
    run_url, _, name = url.rstrip("/").rpartition(f"/{CKPT_DIR}/")
    store = RunStore(run_url if name.startswith("step-") else url)
    name = name if name.startswith("step-") else store.newest()
    if name is None:
        raise ShardtuneError(f"{storage.display(url)} holds no sealed checkpoint; give RUN_URL/{CKPT_DIR}/step-N of a run that saved one.")
    return store.fetch(name, dest / name)


def fetch_model(url: str, cache: Path = Path("~/.cache/shardtune/models")) -> Path:
    """An exported model in a store (a run URL: its model/; or a model folder URL) as a fresh local copy."""
    import shutil

    folder = Path(cache).expanduser() / hashlib.sha256(url.encode()).hexdigest()[:16]
    shutil.rmtree(folder, ignore_errors=True)
    src = storage.join(url, "model") if storage.listing(storage.join(url, "model") + "/", fresh=True) else url.rstrip("/")
    found = storage.listing(src + "/", fresh=True)
    if not found:
        raise ShardtuneError(f"{storage.display(url)} holds no exported model; pass a run URL written by `shardtune train` or a model folder URL.")
    for file_url, _ in found:
        storage.download(file_url, str(folder / file_url[len(src) + 1:]))
    return folder


def _refuse(url: str, rel: str, what: str) -> None:
    raise ShardtuneError(
        f"checkpoint {storage.display(url)}: {rel} {what} (replaced after sealing by another writer, or tampered with), so nothing "
        "in it was loaded; delete that checkpoint folder to resume from an earlier one, or set train.resume=never."
    )
