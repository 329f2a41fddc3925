"""`check_paths`: every path argument of a command checked in one place, in seconds, before Ray starts.

Each problem is one `PathError` (an `InputError`: exit code 2) whose text names the argument and the
cause, e.g. ``OUTPUT out.txt: is an existing file, not a folder; ...``. What is checked:

- an OUTPUT that is an existing file, or a folder that cannot be created or written (a file in the way,
  no permission, a read-only filesystem);
- an OUTPUT inside a local INPUT where the command would read its own outputs back (``inside_ok=False``;
  protect skips what is under OUTPUT and allows it);
- a local INPUT that does not exist, cannot be read, or holds no images or shards;
- an ``s3://`` bucket (input or output) that does not exist or refuses the credentials: one HeadBucket
  request per bucket, not retried.

Storage failures *during* a run (disk full, permission lost, bucket gone) are named by
`storage_problem`, which turns the error into one line that says what to do.
"""

from __future__ import annotations

import errno
import os
import re
from dataclasses import dataclass

from pipeline.io.storage import (
    IMAGE_SUFFIXES,
    SHARD_SUFFIXES,
    TABLES_DIR,
    InputError,
    S3Options,
    has_pattern,
    is_s3,
    pattern_root,
)


class PathError(InputError):
    """A path argument that cannot work; str() is '<ARGUMENT> <path>: <cause>; <what to do>'."""


class StorageError(OSError):
    """A run stopped by its storage (disk full, permission, bucket gone): str() says what and what to do."""


STORAGE_EXIT = 5  # exit code: the output storage failed mid-run (committed work kept; rerun to resume)


@dataclass(frozen=True)
class PathArg:
    """One path argument: how the user named it (INPUT, --clean, --out-dir) and its value."""

    name: str
    uri: str


def check_paths(inputs: list[PathArg], output: PathArg | None, s3: S3Options | dict | None = None,
                inside_ok: bool = False) -> None:
    """Raise `PathError` for the first path argument that cannot work (see the module doc)."""
    s3 = S3Options.of(s3)
    buckets: set[str] = set()
    for arg in inputs:
        if is_s3(arg.uri):
            _check_bucket(arg, s3, buckets)
        else:
            _check_local_input(arg)
    if output is None:
        return
    if is_s3(output.uri):
        _check_bucket(output, s3, buckets)
        return
    _check_local_output(output)
    out = _local(output.uri)
    for arg in inputs:
        if is_s3(arg.uri):
            continue
        root = _local(arg.uri if not _is_shard_path(arg.uri) else pattern_root(_local(arg.uri)))
        if out == root:
            raise PathError(f"{output.name} {output.uri}: is the same folder as {arg.name}; protected files would "
                            "replace the originals: give another folder")
        if not inside_ok and out.startswith(root.rstrip(os.sep) + os.sep):
            raise PathError(f"{output.name} {output.uri}: is inside {arg.name} {arg.uri}, whose listing would read "
                            f"this command's outputs back as inputs; give a folder outside {arg.name}")


def _local(uri: str) -> str:
    path = uri[len("file://"):] if uri.startswith("file://") else uri
    return os.path.realpath(os.path.abspath(os.path.expanduser(path)))


def _is_shard_path(uri: str) -> bool:
    return has_pattern(uri) or uri.endswith(SHARD_SUFFIXES)


def _check_local_input(arg: PathArg) -> None:
    if _is_shard_path(arg.uri):
        root = pattern_root(_local(arg.uri)) if has_pattern(arg.uri) else _local(arg.uri)
        if not os.path.exists(root):
            raise PathError(f"{arg.name} {arg.uri}: {root} does not exist")
        return  # the listing names missing members of a pattern
    path = _local(arg.uri)
    if not os.path.exists(path):
        raise PathError(f"{arg.name} {arg.uri}: does not exist")
    if not os.access(path, os.R_OK):
        raise PathError(f"{arg.name} {arg.uri}: cannot be read (permission denied)")
    if os.path.isfile(path):
        if path.lower().rsplit(".", 1)[-1] in IMAGE_SUFFIXES:
            raise PathError(f"{arg.name} {arg.uri}: is one image file; give the folder that holds it")
        raise PathError(f"{arg.name} {arg.uri}: is a file, neither a folder of images nor a .tar shard")
    others = 0
    for folder, dirs, files in os.walk(path):  # stops at the first image or shard: seconds at most
        dirs[:] = [d for d in dirs if not d.startswith((".", "_")) and not (folder == path and d == TABLES_DIR)]
        for name in files:
            if name.startswith((".", "_")):
                continue
            low = name.lower()
            if low.rsplit(".", 1)[-1] in IMAGE_SUFFIXES or low.endswith(SHARD_SUFFIXES):
                return
            others += 1
    what = f"{others} other file(s)" if others else "nothing"
    raise PathError(f"{arg.name} {arg.uri}: holds no images or shards ({what}; images are "
                    f"{', '.join('.' + s for s in IMAGE_SUFFIXES)}, shards .tar, .tar.gz, .tgz)")


def _check_local_output(arg: PathArg) -> None:
    path = _local(arg.uri)
    if os.path.exists(path) and not os.path.isdir(path):
        raise PathError(f"{arg.name} {arg.uri}: is an existing file, not a folder; give a folder (it is created "
                        "if missing) or an s3:// prefix")
    existing = path
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise PathError(f"{arg.name} {arg.uri}: cannot be created: {existing} is a file")
    if not os.access(existing, os.W_OK | os.X_OK):
        how = "is read-only" if _read_only(existing) else "is not writable by this user (permission denied)"
        verb = "cannot be written" if existing == path else "cannot be created"
        raise PathError(f"{arg.name} {arg.uri}: {verb}: {existing} {how}")


def _read_only(path: str) -> bool:
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except OSError:
        return False


def _check_bucket(arg: PathArg, s3: S3Options, checked: set[str]) -> None:
    """One HeadBucket request (not retried): a missing bucket or refused credentials, named."""
    import boto3
    import botocore.config
    import botocore.exceptions

    bucket = arg.uri[len("s3://"):].split("/", 1)[0]
    if bucket in checked:
        return
    checked.add(bucket)
    if not re.fullmatch(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]", bucket):
        raise PathError(f"{arg.name} {arg.uri}: {bucket!r} is not a valid S3 bucket name")
    opts = s3.resolved()
    kwargs = {"endpoint_url": opts.get("endpoint_url"), "region_name": opts.get("region") or "us-east-1"}
    if opts.get("access_key") and opts.get("secret_key"):
        kwargs.update(aws_access_key_id=opts["access_key"], aws_secret_access_key=opts["secret_key"],
                      aws_session_token=opts.get("session_token"))
    config = botocore.config.Config(retries={"max_attempts": 1, "mode": "standard"}, connect_timeout=5, read_timeout=10,
                                    signature_version=botocore.UNSIGNED if opts.get("anonymous") else None)
    try:
        boto3.client("s3", config=config, **{k: v for k, v in kwargs.items() if v}).head_bucket(Bucket=bucket)
    except botocore.exceptions.NoCredentialsError:
        raise PathError(f"{arg.name} {arg.uri}: no S3 credentials found (set AWS_ACCESS_KEY_ID and "
                        "AWS_SECRET_ACCESS_KEY, a profile or an instance role)") from None
    except botocore.exceptions.ClientError as err:
        code = str(err.response.get("Error", {}).get("Code", ""))
        if code in ("404", "NoSuchBucket", "NotFound"):
            raise PathError(f"{arg.name} {arg.uri}: bucket {bucket} does not exist") from None
        if code in ("403", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
            raise PathError(f"{arg.name} {arg.uri}: access denied to bucket {bucket}: check the S3 credentials "
                            "(AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY) and --endpoint-url") from None
        raise PathError(f"{arg.name} {arg.uri}: bucket {bucket}: {code or err}") from None
    except botocore.exceptions.BotoCoreError as err:  # endpoint unreachable, timeouts
        raise PathError(f"{arg.name} {arg.uri}: cannot reach S3 ({err})") from None


# ---------------------------------------------------------------- storage failures during a run

_STORAGE = [  # (errno, pattern in an error's text, what it is, what to do)
    (errno.ENOSPC, r"No space left on device|\[Errno 28\]|errno 28", "no space left on device", "free space"),
    (errno.EDQUOT, r"Disk quota exceeded|\[Errno 122\]", "disk quota exceeded", "free space or raise the quota"),
    (errno.EROFS, r"Read-only file system|\[Errno 30\]", "read-only file system", "make OUTPUT writable"),
    (errno.EACCES, r"Permission denied|\[Errno 13\]", "permission denied", "fix the permissions of OUTPUT"),
    (None, r"ACCESS_DENIED|AccessDenied|InvalidAccessKeyId|SignatureDoesNotMatch|HTTP status 403",
     "S3 access denied", "check the S3 credentials and the bucket's policy"),
    (None, r"NoSuchBucket|NO_SUCH_BUCKET", "the S3 bucket no longer exists", "recreate it or give another OUTPUT"),
]
_PATH = re.compile(r"\[Errno \d+\] [^:\n]*: '([^'\n]+)'")  # how Python's OSError names its file


def storage_problem(err: BaseException, where: str = "OUTPUT") -> str | None:
    """One line naming a storage failure in `err` (or its causes, Ray's wrapped ones by their text),
    or None when it is not one. E.g. "no space left on device while writing /out/a.png; free space and
    rerun the same command to resume (what was committed is kept)"."""
    texts, seen, e = [], set(), err
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, StorageError):
            return str(e)
        if isinstance(e, OSError):
            for code, _, what, todo in _STORAGE:
                if code is not None and e.errno == code:
                    return _line(what, e.filename or where, todo)
        texts.append(str(e))
        e = getattr(e, "cause", None) or e.__cause__ or e.__context__
    text = "\n".join(texts)
    for _, pattern, what, todo in _STORAGE:
        if re.search(pattern, text):
            found = _PATH.search(text)
            return _line(what, found.group(1) if found else where, todo)
    return None


def _line(what: str, path: str, todo: str) -> str:
    return f"{what} while writing {path}; {todo} and rerun the same command to resume (what was committed is kept)"


def name_problem(path: str, s3: bool = False) -> str | None:
    """Why an output name cannot be held by its destination, or None: a file or folder name over 255 bytes
    (local filesystems), an S3 key over 1024 bytes. (The sample becomes an errors row, not the unit's failure.)"""
    if s3:
        key = path.split("/", 1)[1] if "/" in path else path
        if len(key.encode()) > 1024:
            return f"output name too long for S3 ({len(key.encode())} bytes; keys hold at most 1024)"
        return None
    limit = _name_max(path)
    for part in path.split("/"):
        if len(part.encode()) > limit:
            return f"output name too long for the filesystem ({len(part.encode())} bytes; at most {limit}): {part[:40]}..."
    return None


def _name_max(path: str) -> int:
    folder = os.path.dirname(path)
    while folder and not os.path.exists(folder):
        folder = os.path.dirname(folder)
    try:
        return os.pathconf(folder or "/", "PC_NAME_MAX")
    except (OSError, ValueError):
        return 255
