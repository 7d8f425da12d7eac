"""Paths that may be object-store URLs: the one place shardtune talks to fsspec.

A path is local unless it has a scheme (`s3://bucket/key`, `gs://...`, `https://...`); `file://` is local.
Everything that reads data or moves checkpoints asks here: `listing` (one listing per pattern and process,
shareable between ranks with `seed_listings`), `size`, `open_input` (a seekable binary stream: decompressed when
the name says a codec, ranged GETs for a URL), `read_bytes`, `put_file`, `download`, `remove`.

Credentials come from where each fsspec backend looks (for S3: AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY,
AWS_PROFILE, AWS_ENDPOINT_URL for an S3-compatible store); shardtune never reads, logs or stores them, and
`display` drops a URL's user:password before any message shows it.

Errors: the backends' own retries are off (S3: one attempt each) and `call` retries transient failures
(connection refused or reset, timeouts, 5xx, throttling) with backoff for `retry_seconds`, counting them in
STATS; a permanent one (no such bucket or object, access denied, no credentials, a scheme whose fsspec package
is missing) is one sentence naming the URL and the fix.

Hand-written, and why: a partition must read only its own byte range (fsspec's file objects read ahead by a
block of 5-50 MB, which for small partitions is other slots' data), and the retry budget must outlast a
restarting server and be counted, which backend retries (a few attempts in a second or two) are not.
`RangeReader` fetches exactly what the reader asks for, up to the partition's end, then small blocks for the
record that runs past it (512 bytes, doubling).
"""

from __future__ import annotations

import io
import os
import re
import sys
import time
from collections import Counter
from typing import Callable, Optional

from shardtune import ShardtuneError
from shardtune.compression import Decompressed, PositionedRaw, codec

URL = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://")
PACKAGES = {"s3": "s3fs", "s3a": "s3fs", "gs": "gcsfs", "gcs": "gcsfs", "az": "adlfs", "abfs": "adlfs",
            "abfss": "adlfs", "http": "aiohttp", "https": "aiohttp", "hf": "huggingface_hub"}
BLOCK = 1 << 20  # bytes per GET inside a partition
TAIL = 512  # bytes of the first GET past a partition's end (the last record's tail); doubled at each further one
RETRY_SECONDS = 120.0  # how long `call` retries a transient error; SHARDTUNE_STORE_RETRY_SECONDS overrides it (read at each call)
STATS: Counter = Counter()  # requests, bytes_read, bytes_written, retries (this process)
_LISTINGS: dict[str, list[tuple[str, int]]] = {}
_SIZES: dict[str, int] = {}
READ_TAG = ""  # who reads, for the request log (the stream sets its slot)


def is_url(path) -> bool:
    m = URL.match(str(path))
    return bool(m) and m.group(1).lower() != "file"


def local(path) -> str:
    """A local path as given (`file://` dropped, `~` expanded)."""
    path = str(path)
    return os.path.expanduser(path[len("file://"):] if path.startswith("file://") else path)


def display(url: str) -> str:
    """The URL for messages: without user:password@."""
    return re.sub(r"^([a-zA-Z][a-zA-Z0-9+.-]*://)[^/@]*@", r"\1", str(url))


def join(base: str, *names: str) -> str:
    return "/".join([str(base).rstrip("/"), *[n.strip("/") for n in names]])


def filesystem(url: str):
    """(the fsspec filesystem of the URL's scheme, its options), one sentence when the scheme cannot be served."""
    import fsspec

    scheme = URL.match(url).group(1).lower()
    options = {"config_kwargs": {"retries": {"max_attempts": 1, "mode": "standard"}, "connect_timeout": 5,
                                 "read_timeout": 30}} if scheme in ("s3", "s3a") else {}
    try:
        fs = fsspec.filesystem(scheme, **options)
    except ImportError:
        pkg = PACKAGES.get(scheme, f"the fsspec backend for {scheme}://")
        raise ShardtuneError(f"{display(url)}: reading {scheme}:// URLs needs the package {pkg}; install it (pip install {pkg}) "
                             "or copy the data to a local path.") from None
    except ValueError:
        raise ShardtuneError(f"{display(url)} has the unknown URL scheme {scheme}://; use s3://, gs://, az://, https:// or a local path.") from None
    if hasattr(fs, "retries"):
        fs.retries = 1  # s3fs: retries are `call`'s
    return fs


def _strip(url: str) -> str:
    return URL.sub("", url) if URL.match(url).group(1).lower() in ("s3", "s3a", "gs", "gcs", "az", "abfs", "abfss") else url


def _named(exc: BaseException, *names: str) -> bool:
    return any(c.__name__ in names for c in type(exc).__mro__)


def detail(url: str, exc: BaseException, limit: int = 120) -> str:
    """The error's own words for a sentence: on one line, cut at `limit`, the URL's user:password masked (a
    backend quotes what it could not parse, user:password@ included)."""
    text = " ".join(str(exc).split())
    userinfo = re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*://([^/@]*)@", str(url))
    secrets = {userinfo.group(1), userinfo.group(1).partition(":")[2]} if userinfo else set()
    for secret in sorted(filter(None, secrets), key=len, reverse=True):  # user:password, then the password alone
        text = text.replace(secret, "***")
    return text[:limit]


def permanent(url: str, exc: BaseException) -> Optional[str]:
    """The sentence for an error no retry will fix, or None when it may be transient."""
    shown = display(url)
    if isinstance(exc, ShardtuneError):
        return str(exc)
    cause = exc.__cause__
    if isinstance(exc, FileNotFoundError) and (isinstance(getattr(cause, "status", None), int) or isinstance(cause, (OSError, TimeoutError))):
        exc = cause  # fsspec's https `info` wraps every failure (refused, 503, 403) in FileNotFoundError
    status = getattr(exc, "status", None)
    if isinstance(status, int) and 400 <= status < 500 and status not in (408, 429):  # an HTTP answer: 5xx, 408, 429 are transient
        if status == 404:
            return f"{shown} does not exist (HTTP 404); fix the URL."
        return f"{shown} was refused with HTTP {status} ({detail(url, exc)}); fix the URL or its credentials."
    if _named(exc, "NoCredentialsError", "PartialCredentialsError"):
        return (f"no credentials for {shown}; set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE), and AWS_ENDPOINT_URL "
                "for an S3-compatible store.")
    if isinstance(exc, PermissionError) or _named(exc, "InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied"):
        return (f"access to {shown} was denied ({detail(url, exc)}); check the credentials (AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, "
                "or AWS_PROFILE) and their rights on the bucket.")
    if isinstance(exc, FileNotFoundError):
        what = "bucket" if "bucket" in str(exc).lower() else "object"
        return f"{shown} does not exist (no such {what}); fix the URL, or create the {what} first."
    if isinstance(exc, (IsADirectoryError, NotADirectoryError, ValueError, TypeError)) or _named(exc, "ParamValidationError"):
        return f"{shown} cannot be read ({type(exc).__name__}: {detail(url, exc)}); fix the URL."
    if isinstance(exc, (OSError, TimeoutError)) or _named(exc, "BotoCoreError", "ClientError", "HTTPClientError"):
        return None
    return f"{shown}: {type(exc).__name__}: {detail(url, exc, 160)}; check the URL and the store."


def call(url: str, fn: Callable, *args, retry_seconds: Optional[float] = None, **kwargs):
    """fn(*args, **kwargs), retried with backoff while its errors look transient, for up to retry_seconds."""
    budget = float(os.environ.get("SHARDTUNE_STORE_RETRY_SECONDS", RETRY_SECONDS)) if retry_seconds is None else retry_seconds
    deadline, delay, tries = time.monotonic() + budget, 0.25, 0
    while True:
        STATS["requests"] += 1
        try:
            return fn(*args, **kwargs)
        except Exception as exc:
            sentence = permanent(url, exc)
            if sentence:
                raise ShardtuneError(sentence) from None
            tries += 1
            if time.monotonic() + delay > deadline:
                raise ShardtuneError(
                    f"the object store did not serve {display(url)} for {budget:.0f} s ({tries} tries, last: {type(exc).__name__}: "
                    f"{detail(url, exc)}); check that the store is up and reachable, then rerun (a run resumes from its last sealed checkpoint)."
                ) from None
            STATS["retries"] += 1
            _log("retry", url, type(exc).__name__)
            print(f"shardtune: object store: retrying {display(url)} in {delay:.1f} s after {type(exc).__name__} "
                  f"(try {tries}; {STATS['retries']} retries in this process)", file=sys.stderr, flush=True)
            time.sleep(delay)
            delay = min(delay * 2, 5.0)


# ---------------------------------------------------------------- listing and sizes


def has_magic(path: str) -> bool:
    return any(c in path for c in "*?[")


def listing(pattern: str, fresh: bool = False) -> list[tuple[str, int]]:
    """(url, size) of every object a URL names (an object, a prefix taken as a folder, or a glob), sorted; one
    listing per pattern in this process (and none at all after `seed_listings`) unless `fresh`."""
    if pattern in _LISTINGS and not fresh:
        return _LISTINGS[pattern]
    fs, scheme = filesystem(pattern), URL.match(pattern).group(0)
    path = _strip(pattern)
    if fresh:
        fs.invalidate_cache()
    _log("list", pattern)
    if has_magic(path):
        found = call(pattern, fs.glob, path, detail=True)
    else:
        found = call(pattern, fs.find, path, detail=True)
        if not found and not path.endswith("/") and scheme.startswith("http"):
            found = {path: call(pattern, fs.info, path)}
    prefix = scheme if path != pattern else ""
    files = sorted((prefix + name, int(info.get("size") or 0)) for name, info in found.items() if info.get("type", "file") == "file")
    seed_listings({pattern: files})
    return files


def seed_listings(listings: dict[str, list]) -> None:
    """Listings made elsewhere (the main rank's, shared): later `listing` and `size` calls ask the store nothing."""
    for pattern, files in listings.items():
        _LISTINGS[pattern] = [(f, int(s)) for f, s in files]
        _SIZES.update(_LISTINGS[pattern])


def listings() -> dict[str, list]:
    return dict(_LISTINGS)


def size(path: str) -> int:
    if not is_url(path):
        return os.path.getsize(local(path))
    if path not in _SIZES:
        _SIZES[path] = int(call(path, filesystem(path).info, _strip(path))["size"])
    return _SIZES[path]


def exists(path: str) -> bool:
    if not is_url(path):
        return os.path.exists(local(path))
    fs = filesystem(path)
    fs.invalidate_cache()
    return bool(call(path, fs.exists, _strip(path)))


# ---------------------------------------------------------------- reading


def _log(*fields) -> None:
    """With SHARDTUNE_STORE_LOG=FOLDER, a line per GET (`read url start end`), listing (`list pattern`) and retry
    (`retry url error`) in FOLDER/reads-<pid>.tsv, prefixed by READ_TAG (the slot reading, set by the stream)."""
    folder = os.environ.get("SHARDTUNE_STORE_LOG")
    if folder:
        with open(os.path.join(folder, f"reads-{os.getpid()}.tsv"), "a") as f:
            f.write("\t".join(map(str, (READ_TAG, *fields))) + "\n")


class RangeReader(PositionedRaw):
    """An object's bytes through ranged GETs: at most BLOCK per request, and past `end_hint` only small ones (TAIL,
    doubling): a record that runs past a partition's end is read to its end, and little more is fetched ahead."""

    def __init__(self, url: str, end_hint: Optional[int] = None):
        self.url, self.fs, self.path = url, filesystem(url), _strip(url)
        self.total = size(url)
        self.end_hint = self.total if end_hint is None else min(end_hint, self.total)
        self.pos, self.tail = 0, TAIL

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        self.pos = {io.SEEK_SET: offset, io.SEEK_CUR: self.pos + offset, io.SEEK_END: self.total + offset}[whence]
        return self.pos

    def readinto(self, buffer) -> int:
        past = self.pos >= self.end_hint
        want = min(len(buffer), BLOCK, self.tail if past else self.end_hint - self.pos, self.total - self.pos)
        if want <= 0:
            return 0
        if past:
            self.tail = min(2 * self.tail, BLOCK)
        data = call(self.url, self.fs.cat_file, self.path, start=self.pos, end=self.pos + want)
        _log("read", self.url, self.pos, self.pos + len(data))
        STATS["bytes_read"] += len(data)
        buffer[: len(data)] = data
        self.pos += len(data)
        return len(data)

    def readall(self) -> bytes:
        """The rest in BLOCK-sized GETs (io.RawIOBase's would ask for 8 KiB at a time: `read()` is one GET per 8 KiB)."""
        chunks = []
        while chunk := self.read(BLOCK):
            chunks.append(chunk)
        return b"".join(chunks)


def open_input(path: str, end_hint: Optional[int] = None) -> io.BufferedReader:
    """A seekable binary stream of a file's (decompressed) bytes; for a URL, GETs stay below `end_hint` where they can."""
    if is_url(path):
        def open_raw():
            return io.BufferedReader(RangeReader(path, end_hint), buffer_size=BLOCK)
    else:
        def open_raw():
            return open(local(path), "rb")
    name = codec(path)
    if name is None:
        return open_raw()
    return io.BufferedReader(Decompressed(display(path), name, open_raw), buffer_size=BLOCK)


def read_bytes(path: str) -> bytes:
    if not is_url(path):
        with open(local(path), "rb") as f:
            return f.read()
    data = call(path, filesystem(path).cat_file, _strip(path))
    _log("read", path, 0, len(data))
    STATS["bytes_read"] += len(data)
    return data


# ---------------------------------------------------------------- writing


def put_file(src: str, url: str) -> None:
    call(url, filesystem(url).put_file, src, _strip(url))
    STATS["bytes_written"] += os.path.getsize(src)


def put_bytes(url: str, data: bytes) -> None:
    call(url, filesystem(url).pipe_file, _strip(url), data)
    STATS["bytes_written"] += len(data)


def download(url: str, dest: str) -> None:
    os.makedirs(os.path.dirname(dest) or ".", exist_ok=True)
    call(url, filesystem(url).get_file, _strip(url), dest)


def remove(url: str) -> None:
    """An object, or everything under a prefix; gone already is fine."""
    fs = filesystem(url)
    try:
        call(url, fs.rm, _strip(url), recursive=True)
    except ShardtuneError as exc:
        if "does not exist" not in str(exc):
            raise


def subfolders(url: str) -> list[str]:
    """The names directly under a prefix (`step-00000010`, ...); [] when there is none."""
    fs = filesystem(url)
    try:
        fs.invalidate_cache()
        entries = call(url, fs.ls, _strip(url), detail=False)
    except ShardtuneError as exc:
        if "does not exist" in str(exc):
            return []
        raise
    return sorted(e.rstrip("/").rsplit("/", 1)[-1] for e in entries)
