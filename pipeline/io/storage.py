"""Where samples come from: URIs, filesystems, shard and folder listings, and `read_samples`.

One path for data. An input or output is a URI:

- a local folder of images (``~/art``),
- local WebDataset shards (``data/shards/``, ``data/shard-{000000..000099}.tar``),
- shards in S3 (``s3://bucket/prefix/``, ``s3://bucket/shard-{0000..0099}.tar``).

S3 goes through `pyarrow.fs.S3FileSystem` with endpoint, region and credentials taken from
`S3Options` or from the standard AWS environment variables (``AWS_ENDPOINT_URL``,
``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``, ``AWS_REGION`` /
``AWS_DEFAULT_REGION``), so AWS S3, MinIO and moto all work the same way. Every S3 request (listings,
reads in Ray tasks, shard parts, tables, markers) is retried on transient faults (503 SlowDown, 500,
connection resets, timeouts) as `S3Retry` says: the AWS SDK's standard retry strategy with
exponential backoff, 10 attempts by default.

`read_samples(uri)` gives a Ray Dataset with one row per sample and the columns

    key     str    the WebDataset ``__key__`` (folder: relative path without suffix)
    source  str    the shard URI (folder: the file's URI)
    image   bytes  the image member (None when a sample has no image member)
    ext     str    the image member's suffix ("png", "jpg", ...)
    meta    str    the sample's ``.json`` member as text, or None

Shards are read by `pipeline.io.webdataset` (whole-shard checks, safe names, every image member
found, strict JSON; ``.tar.gz``/``.tgz`` too): members stay bytes, so ``.pkl``/``.pyd``/``.pt``
members are never unpickled (they are passed through untouched).
Everything under ``<root>/tables/`` (the Parquet tables of a run) is skipped by every listing.
"""

from __future__ import annotations

import os
import posixpath
import re
from dataclasses import dataclass, field, fields
from urllib.parse import urlparse

from pyarrow import fs as pafs

IMAGE_SUFFIXES = ("png", "jpg", "jpeg", "webp", "tif", "tiff", "bmp", "gif")  # primary-image preference order
COMPRESSED_SUFFIXES = (".tar.gz", ".tgz")

SHARD_SUFFIXES = (".tar", *COMPRESSED_SUFFIXES)
# members that would run code if deserialised: only ever carried as opaque bytes
UNSAFE_SUFFIXES = ("pkl", "pickle", "pyd", "pt", "pth")
TABLES_DIR = "tables"
S3_OPTION_KEYS = ("endpoint_url", "region", "access_key", "secret_key", "session_token", "anonymous")


class InputError(ValueError):
    """A URI that cannot be used (missing bucket, no shards, bad credentials...). str() is the reason."""


# ---------------------------------------------------------------- brace patterns


_BRACE = re.compile(r"\{([^{}]*)\}")


def expand_braces(pattern: str) -> list[str]:
    """Expand ``{000..099}`` ranges (zero padding kept) and ``{a,b}`` lists, as WebDataset does."""
    m = _BRACE.search(pattern)
    if not m:
        return [pattern]
    head, body, tail = pattern[: m.start()], m.group(1), pattern[m.end() :]
    rng = re.fullmatch(r"(-?\d+)\.\.(-?\d+)", body)
    if rng:
        lo, hi = rng.group(1), rng.group(2)
        width = len(lo) if lo.startswith("0") and len(lo) > 1 else 0
        step = 1 if int(hi) >= int(lo) else -1
        items = [str(i).zfill(width) for i in range(int(lo), int(hi) + step, step)]
    else:
        items = body.split(",")
    return [out for item in items for out in expand_braces(head + item + tail)]


def has_pattern(path: str) -> bool:
    return "{" in path or any(c in path for c in "*?[")


# ---------------------------------------------------------------- filesystems


@dataclass(frozen=True)
class S3Retry:
    """How the pipeline's S3 client rides out transient faults (validated once, when built).

    `max_attempts` counts the first try: AWS's standard retry strategy (exponential backoff with
    jitter) retries throttling (503 SlowDown), 5xx answers, connection resets and timeouts, never
    403/404. The timeouts are per connection attempt and per socket read.
    """

    max_attempts: int = 10
    connect_timeout_s: float = 10.0
    request_timeout_s: float = 60.0

    def __post_init__(self):
        if int(self.max_attempts) != self.max_attempts or self.max_attempts < 1:
            raise ValueError(f"--s3-max-attempts must be an integer >= 1, got {self.max_attempts!r}")
        for name in ("connect_timeout_s", "request_timeout_s"):
            if not float(getattr(self, name)) > 0:
                raise ValueError(f"S3Retry.{name} must be > 0 seconds")


@dataclass(frozen=True)
class S3Options:
    """How to reach S3: one typed object, validated once (CLI, config file ``s3:`` section, or Python).

    Fields left None come from the standard AWS environment variables when a filesystem is made
    (``AWS_ENDPOINT_URL[_S3]``, ``AWS_REGION`` / ``AWS_DEFAULT_REGION``, ``AWS_ACCESS_KEY_ID``,
    ``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``), so credentials need never be written down.
    Secrets never appear in its repr, and `public()` is all that is ever logged or stored.
    """

    endpoint_url: str | None = None
    region: str | None = None
    access_key: str | None = field(default=None, repr=False)
    secret_key: str | None = field(default=None, repr=False)
    session_token: str | None = field(default=None, repr=False)
    anonymous: bool = False
    retry: S3Retry = field(default_factory=S3Retry)  # attempts and timeouts of every S3 request

    def __post_init__(self):
        if not isinstance(self.retry, S3Retry):
            raise TypeError(f"retry must be an S3Retry, got {type(self.retry).__name__}")

    @classmethod
    def of(cls, value: "S3Options | dict | None") -> "S3Options":
        """An `S3Options` from itself, None (all from the environment) or a mapping of its field names."""
        if isinstance(value, cls):
            return value
        values = {k: v for k, v in dict(value or {}).items() if v not in (None, "")}
        unknown = set(values) - {f.name for f in fields(cls)}
        if unknown:
            raise InputError(f"unknown S3 option(s): {', '.join(sorted(unknown))}; known: {', '.join(S3_OPTION_KEYS)}")
        return cls(**values)

    def resolved(self) -> dict:
        """The connection settings, explicit values first, then the standard AWS environment variables."""
        env = os.environ
        out = {
            "endpoint_url": env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL"),
            "region": env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION"),
            "access_key": env.get("AWS_ACCESS_KEY_ID"),
            "secret_key": env.get("AWS_SECRET_ACCESS_KEY"),
            "session_token": env.get("AWS_SESSION_TOKEN"),
            "anonymous": False,
        }
        out.update({k: getattr(self, k) for k in S3_OPTION_KEYS if getattr(self, k) not in (None, "", False)})
        return out

    def public(self) -> dict:
        """What may be logged or stored: never keys, secrets or tokens."""
        opts = self.resolved()
        return {"endpoint_url": opts.get("endpoint_url"), "region": opts.get("region")}


class RetryingS3FileSystem(pafs.S3FileSystem):
    """`pyarrow.fs.S3FileSystem` that keeps its `S3Retry` when pickled to Ray workers.

    (pyarrow's own pickling drops `retry_strategy`: a worker would fall back to 3 attempts.)
    """

    def __init__(self, retry: S3Retry, **kwargs):
        super().__init__(retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=int(retry.max_attempts)),
                         connect_timeout=float(retry.connect_timeout_s), request_timeout=float(retry.request_timeout_s),
                         **kwargs)
        self.retry, self._kwargs = retry, kwargs

    def __reduce__(self):
        return RetryingS3FileSystem._rebuild, (self.retry, self._kwargs)

    @staticmethod
    def _rebuild(retry: S3Retry, kwargs: dict) -> "RetryingS3FileSystem":
        return RetryingS3FileSystem(retry, **kwargs)


# what the AWS SDK reports, without retrying, when a 503 answers a read smaller than the error's XML body
# (it writes the body into the read's own buffer, which overflows: "Failed to flush response stream")
UNRETRIED_READ_FAULTS = ("Failed to flush response stream",)


def read_small_file(filesystem: pafs.FileSystem, path: str) -> bytes:
    """The whole of a small file (a marker, a few hundred bytes), retried where the SDK does not.

    The filesystem's own retry strategy covers everything else; only `UNRETRIED_READ_FAULTS` are
    retried here, with the same number of attempts (`S3Retry.max_attempts`) and exponential backoff.
    """
    import time

    attempts = getattr(getattr(filesystem, "retry", None), "max_attempts", 1)
    for attempt in range(attempts):
        try:
            with filesystem.open_input_stream(path) as f:
                return f.read()
        except OSError as err:
            if attempt + 1 >= attempts or not any(t in str(err) for t in UNRETRIED_READ_FAULTS):
                raise
            time.sleep(min(0.05 * 2**attempt, 5.0))
    raise AssertionError("unreachable")


def s3_filesystem(s3: "S3Options | dict | None" = None, retry: S3Retry | None = None) -> pafs.S3FileSystem:
    """A retrying S3 filesystem for `s3` (`retry` overrides its retry settings)."""
    s3 = S3Options.of(s3)
    retry = retry or s3.retry
    opts = s3.resolved()
    kwargs: dict = {"region": opts.get("region") or "us-east-1"}
    endpoint = opts.get("endpoint_url")
    if endpoint:
        parsed = urlparse(endpoint if "://" in endpoint else f"https://{endpoint}")
        kwargs["endpoint_override"] = parsed.netloc + parsed.path.rstrip("/")
        kwargs["scheme"] = parsed.scheme
    if opts.get("anonymous"):
        kwargs["anonymous"] = True
    elif opts.get("access_key") and opts.get("secret_key"):
        kwargs["access_key"] = opts["access_key"]
        kwargs["secret_key"] = opts["secret_key"]
        if opts.get("session_token"):
            kwargs["session_token"] = opts["session_token"]
    return RetryingS3FileSystem(retry or S3Retry(), **kwargs)


def is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


def split_uri(uri: str, s3: "S3Options | dict | None" = None, retry: S3Retry | None = None
              ) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path) without looking at what is there. S3 paths are ``bucket/key``."""
    if is_s3(uri):
        path = uri[len("s3://") :]
        return s3_filesystem(s3, retry), path if has_pattern(path) else path.rstrip("/")
    if "://" in uri and not uri.startswith("file://"):
        raise InputError(f"unsupported URI scheme in {uri!r}: use a local path or s3://bucket/prefix")
    path = uri[len("file://") :] if uri.startswith("file://") else uri
    return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(path))


def to_uri(filesystem: pafs.FileSystem, path: str) -> str:
    """The URI of `path` on `filesystem` (what tables and manifests record)."""
    return f"s3://{path}" if isinstance(filesystem, pafs.S3FileSystem) else path


def _explain(err: Exception, uri: str) -> InputError:
    text = str(err)
    if "ACCESS_DENIED" in text or "InvalidAccessKeyId" in text or "SignatureDoesNotMatch" in text or "403" in text:
        return InputError(f"access denied for {uri}: check the S3 credentials (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY) and endpoint")
    if "NoSuchBucket" in text or "NO_SUCH_BUCKET" in text:
        return InputError(f"bucket not found: {uri}")
    first = text.splitlines()[0] if text else type(err).__name__
    return InputError(f"cannot access {uri}: {first}")


def file_info(filesystem: pafs.FileSystem, path: str, uri: str) -> pafs.FileInfo:
    try:
        return filesystem.get_file_info(path)
    except OSError as err:
        raise _explain(err, uri) from None


def check_bucket(filesystem: pafs.FileSystem, path: str, uri: str) -> None:
    """Raise `InputError` when the bucket of an S3 path is missing or not accessible."""
    if not isinstance(filesystem, pafs.S3FileSystem):
        return
    bucket = path.split("/", 1)[0]
    info = file_info(filesystem, bucket, uri)
    if info.type == pafs.FileType.NotFound:
        raise InputError(f"bucket not found: s3://{bucket} (from {uri})")


# ---------------------------------------------------------------- listings


@dataclass
class Links:
    """How a local folder listing treats symbolic links, and what it skipped (filled in by the listing).

    Each real file is listed once and no directory twice, so a loop (``sub/loop -> ..``) ends at once.
    A link whose target is inside the listed folder is skipped (the target is listed where it is); one
    that leads out of it is skipped unless `follow_external` (``--follow-external-links``). Links to
    nothing are kept: reading them gives the sample's error row instead of a silent gap.
    """

    follow_external: bool = False
    skipped: list = field(default_factory=list)  # (link path, why) for each link not followed

    def summary(self) -> str | None:
        """One line for the run summary, or None when nothing was skipped."""
        if not self.skipped:
            return None
        whys: dict[str, int] = {}
        for _, why in self.skipped:
            whys[why] = whys.get(why, 0) + 1
        return f"{len(self.skipped)} symbolic link(s) in INPUT skipped: " + "; ".join(
            f"{n} {why}" for why, n in sorted(whys.items(), key=lambda kv: -kv[1]))


LINK_OUTSIDE = "lead out of INPUT (--follow-external-links follows them)"
LINK_INSIDE = "lead to a file or folder inside INPUT, listed once where it is"
LINK_LOOP = "close a loop (lead to a folder above them)"
LINK_SEEN = "lead to a file or folder already listed (a loop or a second link)"


def _local_walk(root: str, links: Links) -> list[pafs.FileInfo]:
    """Files under a local `root`, directory links never followed around a loop or (by default) out of root."""
    real_root = os.path.realpath(root)
    seen_dirs, seen_files, out, stack = {real_root}, set(), [], [root]

    def inside(target: str) -> bool:
        return target == real_root or target.startswith(real_root.rstrip(os.sep) + os.sep)

    while stack:
        folder = stack.pop()
        with os.scandir(folder) as entries:
            entries = sorted(entries, key=lambda e: e.name)
        for entry in entries:
            path = entry.path
            if entry.is_symlink():
                target = os.path.realpath(path)
                if not os.path.exists(target):
                    out.append(pafs.FileInfo(path, pafs.FileType.NotFound))  # a link to nothing: an error row
                    continue
                here = os.path.realpath(folder)
                if os.path.isdir(target) and (here == target or here.startswith(target.rstrip(os.sep) + os.sep)):
                    links.skipped.append((path, LINK_LOOP))  # a folder above the link: a loop
                    continue
                if inside(target):
                    links.skipped.append((path, LINK_INSIDE))
                    continue
                if not inside(target) and not links.follow_external:
                    links.skipped.append((path, LINK_OUTSIDE))
                    continue
                seen = seen_dirs if os.path.isdir(target) else seen_files
                if target in seen:
                    links.skipped.append((path, LINK_SEEN))
                    continue
                seen.add(target)
                if os.path.isdir(target):
                    stack.append(path)
                elif os.path.isfile(target):
                    st = os.stat(target)
                    out.append(pafs.FileInfo(path, pafs.FileType.File, size=st.st_size, mtime_ns=st.st_mtime_ns))
            elif entry.is_dir(follow_symlinks=False):
                real = os.path.realpath(path)
                if real not in seen_dirs:
                    seen_dirs.add(real)
                    stack.append(path)
            elif entry.is_file(follow_symlinks=False):
                real = os.path.realpath(path)
                if real not in seen_files:
                    seen_files.add(real)
                    st = entry.stat(follow_symlinks=False)
                    out.append(pafs.FileInfo(path, pafs.FileType.File, size=st.st_size, mtime_ns=st.st_mtime_ns))
    return out


def _walk(filesystem: pafs.FileSystem, root: str, uri: str, links: Links | None = None) -> list[pafs.FileInfo]:
    """Files under `root` (tables/ and hidden entries skipped). Local folders: symbolic links as `Links`
    says (default: never out of `root`, never around a loop; links to nothing kept)."""
    try:
        if isinstance(filesystem, pafs.LocalFileSystem):
            infos = _local_walk(root, links if links is not None else Links()) if os.path.isdir(root) else []
        else:
            infos = filesystem.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True))
    except OSError as err:
        raise _explain(err, uri) from None
    skip = posixpath.join(root.rstrip("/"), TABLES_DIR) + "/"
    return [
        i for i in infos
        if i.type in (pafs.FileType.File, pafs.FileType.NotFound) and not i.path.startswith(skip)
        and not any(part.startswith((".", "_")) for part in posixpath.relpath(i.path, root).split("/"))
    ]


def _suffix(path: str) -> str:
    return posixpath.splitext(path)[1].lower().lstrip(".")


def parse_uri(uri: str, s3: "S3Options | dict | None" = None, retry: S3Retry | None = None
              ) -> tuple[pafs.FileSystem, str, str]:
    """(filesystem, path, kind) for a URI; kind is "shards" or "folder".

    A brace/glob pattern or a ``.tar`` path is "shards"; a directory (or S3 prefix) holding ``.tar``
    files is "shards"; anything else (a folder of images, or one that does not exist yet) is "folder".
    """
    filesystem, path = split_uri(uri, s3, retry)
    if has_pattern(path) or path.endswith(SHARD_SUFFIXES):
        return filesystem, path, "shards"
    check_bucket(filesystem, path, uri)
    if any(i.path.endswith(SHARD_SUFFIXES) for i in _walk(filesystem, path, uri)):
        return filesystem, path, "shards"
    return filesystem, path, "folder"


def pattern_root(path: str) -> str:
    """The directory part of a path before its first pattern character."""
    if not has_pattern(path) and not path.endswith(SHARD_SUFFIXES):
        return path.rstrip("/")
    cut = min([path.index(c) for c in "{*?[" if c in path] + [len(path)])
    return posixpath.dirname(path[:cut])


def list_shards(filesystem: pafs.FileSystem, path: str, uri: str | None = None) -> list[str]:
    """Every shard path of a shard URI, in a stable order (missing pattern members are an error)."""
    return [i.path for i in shard_infos(filesystem, path, uri)]


def shard_infos(filesystem: pafs.FileSystem, path: str, uri: str | None = None, links: Links | None = None
                ) -> list[pafs.FileInfo]:
    """`list_shards` with each shard's size and mtime, from the listing itself (no second request)."""
    uri = uri or to_uri(filesystem, path)
    if "{" in path:
        infos = [file_info(filesystem, p, uri) for p in expand_braces(path)]
        missing = [to_uri(filesystem, i.path) for i in infos if i.type != pafs.FileType.File]
        if missing:
            raise InputError(f"{len(missing)} shard(s) of {uri} not found, e.g. {missing[0]}")
        return infos
    if any(c in path for c in "*?["):
        import fnmatch

        root = pattern_root(path)
        return sorted((i for i in _walk(filesystem, root, uri, links) if fnmatch.fnmatch(i.path, path)),
                      key=lambda i: i.path)
    info = file_info(filesystem, path, uri)
    if info.type == pafs.FileType.File:
        return [info]
    return sorted((i for i in _walk(filesystem, path, uri, links) if i.path.endswith(SHARD_SUFFIXES)),
                  key=lambda i: i.path)


def list_images(filesystem: pafs.FileSystem, path: str, uri: str | None = None) -> list[str]:
    """Every image file under a folder, in a stable order (tables/ and hidden entries skipped)."""
    return [i.path for i in image_infos(filesystem, path, uri)]


def image_infos(filesystem: pafs.FileSystem, path: str, uri: str | None = None, links: Links | None = None
                ) -> list[pafs.FileInfo]:
    """`list_images` with each file's size and mtime (what a unit's input identity covers); `links`: how
    local symbolic links are followed, and what was skipped."""
    uri = uri or to_uri(filesystem, path)
    return sorted((i for i in _walk(filesystem, path, uri, links) if _suffix(i.path) in IMAGE_SUFFIXES), key=lambda i: i.path)


def folder_key(path: str, root: str, same_stem: frozenset | set = frozenset()) -> str:
    """Sample key of an image file: its relative path without suffix, or with it for the files in
    `same_stem` (`same_stem_files`), so that ``a.png`` and ``a.jpg`` are two samples, two keys."""
    rel = posixpath.relpath(path, root) if root else path
    return rel if path in same_stem else posixpath.splitext(rel)[0]


def same_stem_files(paths: list[str]) -> set[str]:
    """The files that share their path-without-suffix with another file (usually none)."""
    stems: dict[str, list[str]] = {}
    for path in paths:
        stems.setdefault(posixpath.splitext(path)[0], []).append(path)
    return {p for group in stems.values() if len(group) > 1 for p in group}
