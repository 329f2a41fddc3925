"""Paths: every path argument checked before Ray starts (one line naming it, exit 2); folder listings
that never leave INPUT through a link or go round a loop; storage failures during a run named as such
(exit 5) and resumed by a rerun; output names the destination cannot hold are one sample's error row."""

from __future__ import annotations

import os

import numpy as np
import pyarrow.parquet as pq
import pytest
from pyarrow import fs as pafs

from pipeline.cli import main
from pipeline.io.files import remove_stale_temps, temp_sibling
from pipeline.io.paths import STORAGE_EXIT, PathArg, PathError, check_paths, name_problem, storage_problem
from pipeline.io.sample_data import png_bytes
from pipeline.io.storage import Links, image_infos

FAST = ["--model", "tiny", "--steps", "2", "--no-progress", "--device", "cpu"]


def photo(seed: int = 0, size: int = 24) -> bytes:
    return png_bytes(np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8))


@pytest.fixture
def photos(tmp_path):
    src = tmp_path / "photos"
    src.mkdir()
    for i in range(2):
        (src / f"p{i}.png").write_bytes(photo(i))
    return src


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    return lines[0]


# ---------------------------------------------------------------- before Ray: one line, exit 2


@pytest.mark.parametrize("command", ["protect", "evaluate", "study"])
def test_output_that_is_an_existing_file(command, photos, tmp_path, capsys):
    out = tmp_path / "out.txt"
    out.write_text("notes")
    argv = {"protect": ["protect", str(photos), str(out), *FAST],
            "evaluate": ["evaluate", str(photos), "--clean", str(photos), "--output", str(out), "--model", "tiny"],
            "study": ["study", str(photos), str(out), *FAST]}[command]
    assert main(argv) == 2
    line = one_error_line(capsys)
    name = "--output" if command == "evaluate" else "OUTPUT"
    assert line.startswith(f"mimicshield: error: {name} {out}: is an existing file"), line
    assert out.read_text() == "notes"


def test_output_that_cannot_be_created(photos, tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    assert main(["protect", str(photos), str(tmp_path / "file" / "out"), *FAST]) == 2
    assert "OUTPUT" in (line := one_error_line(capsys)) and f"cannot be created: {tmp_path / 'file'} is a file" in line


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes anywhere")
def test_output_in_a_folder_without_write_permission(photos, tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        assert main(["protect", str(photos), str(locked / "out"), *FAST]) == 2
        assert "cannot be created" in one_error_line(capsys)
    finally:
        locked.chmod(0o700)


def test_output_inside_input_refused_where_it_would_be_read_back(photos, tmp_path, capsys):
    # evaluate would list its own sample grids as protected images next time; protect skips OUTPUT (allowed)
    assert main(["evaluate", str(photos), "--clean", str(photos), "--output", str(photos / "eval"),
                 "--model", "tiny"]) == 2
    line = one_error_line(capsys)
    assert line.startswith(f"mimicshield: error: --output {photos / 'eval'}: is inside PROTECTED"), line
    check_paths([PathArg("INPUT", str(photos))], PathArg("OUTPUT", str(photos / "out")), inside_ok=True)
    with pytest.raises(PathError, match="same folder as INPUT"):
        check_paths([PathArg("INPUT", str(photos))], PathArg("OUTPUT", str(photos) + "/"), inside_ok=True)


@pytest.mark.parametrize("layout", ["empty", "no images", "missing", "one image"])
def test_input_without_images(layout, tmp_path, capsys):
    src = tmp_path / "in"
    if layout in ("empty", "no images"):
        src.mkdir()
    if layout == "no images":
        (src / "notes.txt").write_text("no images here")
    if layout == "one image":
        src = tmp_path / "a.png"
        src.write_bytes(photo())
    assert main(["protect", str(src), str(tmp_path / "out"), *FAST]) == 2
    line = one_error_line(capsys)
    assert line.startswith(f"mimicshield: error: INPUT {src}: ")
    expected = {"empty": "holds no images or shards (nothing", "no images": "holds no images or shards (1 other file",
                "missing": "does not exist", "one image": "is one image file"}[layout]
    assert expected in line, line
    assert not (tmp_path / "out").exists()


def test_s3_bucket_that_does_not_exist(s3_server, photos, capsys):
    assert main(["protect", str(photos), "s3://no-such-bucket-here/out/", *FAST]) == 2
    assert one_error_line(capsys) == ("mimicshield: error: OUTPUT s3://no-such-bucket-here/out/: bucket "
                                      "no-such-bucket-here does not exist")
    with pytest.raises(PathError, match="not a valid S3 bucket name"):
        check_paths([], PathArg("OUTPUT", "s3://Bad_Bucket/x"))


def test_s3_credentials_refused(s3_server, s3_bucket, photos, capsys, monkeypatch):
    from moto import settings as moto_settings

    monkeypatch.setattr(moto_settings, "INITIAL_NO_AUTH_ACTION_COUNT", 0)  # the loopback server now checks keys
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAWRONGWRONGWRONG1")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-secret-never-printed")
    assert main(["protect", str(photos), f"s3://{s3_bucket}/out/", *FAST]) == 2
    line = one_error_line(capsys)
    assert line.startswith(f"mimicshield: error: OUTPUT s3://{s3_bucket}/out/: access denied to bucket {s3_bucket}")
    assert "wrong-secret" not in line


def test_evaluate_reaches_s3_through_its_endpoint_option(s3_server, photos, capsys, monkeypatch):
    """evaluate's --endpoint-url is the endpoint its S3 requests go to, over AWS_ENDPOINT_URL (as for protect)."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens there
    args = ["evaluate", str(photos), "--clean", str(photos), "--output", "s3://no-such-bucket-here/eval/",
            "--model", "tiny", "--device", "cpu"]
    assert main([*args, "--endpoint-url", s3_server["endpoint_url"], "--region", "us-east-1"]) == 2
    assert one_error_line(capsys) == ("mimicshield: error: --output s3://no-such-bucket-here/eval/: bucket "
                                      "no-such-bucket-here does not exist")  # the moto server's answer
    assert main(args) == 2
    assert "cannot reach S3" in one_error_line(capsys)  # without the option: the environment's endpoint


def test_demo_out_dir_that_is_a_file(tmp_path, capsys):
    (tmp_path / "demo").write_text("x")
    assert main(["demo", "--out-dir", str(tmp_path / "demo")]) == 2
    assert one_error_line(capsys).startswith(f"mimicshield: error: --out-dir {tmp_path / 'demo'}: is an existing file")


# ---------------------------------------------------------------- symbolic links in a folder INPUT


@pytest.fixture
def linked(tmp_path):
    """in/: a.png, sub/b.png, sub/loop -> .. (a loop), alias.png -> a.png, ext -> ../outside (holds c.png),
    passwd.png -> a file outside INPUT."""
    root, outside = tmp_path / "in", tmp_path / "outside"
    (root / "sub").mkdir(parents=True)
    outside.mkdir()
    (root / "a.png").write_bytes(photo(0))
    (root / "sub" / "b.png").write_bytes(photo(1))
    (outside / "c.png").write_bytes(photo(2))
    (outside / "secret.txt").write_text("not an image")
    (root / "sub" / "loop").symlink_to("..")
    (root / "alias.png").symlink_to("a.png")
    (root / "ext").symlink_to("../outside")
    (root / "passwd.png").symlink_to(outside / "secret.txt")
    return root


def listed(root, follow: bool = False) -> tuple[list[str], Links]:
    links = Links(follow_external=follow)
    infos = image_infos(pafs.LocalFileSystem(), str(root), links=links)
    return [os.path.relpath(i.path, root) for i in infos], links


def test_listing_stays_inside_input_each_file_once(linked):
    names, links = listed(linked)
    assert names == ["a.png", "sub/b.png"]  # not sub/loop/..., not alias.png (a.png once), nothing outside
    skipped = {os.path.relpath(p, linked): why for p, why in links.skipped}
    assert set(skipped) == {"sub/loop", "alias.png", "ext", "passwd.png"}
    assert "loop" in skipped["sub/loop"] and "out of INPUT" in skipped["ext"] and "out of INPUT" in skipped["passwd.png"]
    assert links.summary().startswith("4 symbolic link(s) in INPUT skipped: 2 lead out of INPUT")


def test_follow_external_links_reads_them_once(linked):
    (linked / "ext2").symlink_to("../outside")  # a second way to the same folder
    names, links = listed(linked, follow=True)
    assert names == ["a.png", "ext/c.png", "passwd.png", "sub/b.png"] or names == [
        "a.png", "ext2/c.png", "passwd.png", "sub/b.png"]
    assert sum("already listed" in why for _, why in links.skipped) == 1


def test_run_summary_counts_skipped_links(linked, tmp_path):
    from pipeline.batch.driver import preflight
    from pipeline.commands.protect import parse_settings

    plan = preflight(parse_settings([str(linked), str(tmp_path / "out"), *FAST]))
    assert [os.path.basename(p) for u in plan.units for p in u.inputs] == ["a.png", "b.png"]
    assert plan.links.summary().startswith("4 symbolic link(s) in INPUT skipped")


# ---------------------------------------------------------------- during a run


def test_temp_names_are_short_and_stale_ones_removed(tmp_path):
    long_name = str(tmp_path / ("x" * 250 + ".png"))
    assert len(os.path.basename(temp_sibling(long_name))) < 30
    (tmp_path / ".a.png.0123abcd.tmp").write_bytes(b"old")  # an older version's temp name
    (tmp_path / os.path.basename(temp_sibling(long_name))).write_bytes(b"killed")
    (tmp_path / ".keep.tmp").write_bytes(b"not ours")
    assert remove_stale_temps(None, str(tmp_path)) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == [".keep.tmp"]


def test_storage_problem_names_the_cause_and_the_file():
    import errno

    err = OSError(errno.ENOSPC, "No space left on device", "/out/a.png")
    assert storage_problem(err) == ("no space left on device while writing /out/a.png; free space and rerun the "
                                    "same command to resume (what was committed is kept)")
    wrapped = RuntimeError("UDF failed\n  File \"/x/stages.py\", line 3\nOSError: [Errno 13] Permission denied: '/o/b.png'")
    assert storage_problem(wrapped).startswith("permission denied while writing /o/b.png;")
    assert storage_problem(ValueError("cannot identify image file")) is None
    assert name_problem("/tmp/" + "y" * 256 + ".png").startswith("output name too long for the filesystem")
    assert name_problem("bucket/" + "k" * 1100, s3=True).startswith("output name too long for S3")
    assert name_problem("/tmp/" + "y" * 240 + ".png") is None


def test_disk_full_mid_run_then_rerun_completes(ray_local, tmp_path, capsys, monkeypatch):
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    long_stem = "n" * 240  # legal: 244 bytes with its suffix; the temp name must not lengthen it
    too_long = "t" * 250  # t...t.jpg beside t...t.png, --jpeg-as png: t...t.jpg.png is 258 bytes
    (src / "a.png").write_bytes(photo(0))
    (src / "b.png").write_bytes(photo(1))
    (src / f"{long_stem}.png").write_bytes(photo(2))
    (src / f"{too_long}.png").write_bytes(photo(3))
    (src / f"{too_long}.jpg").write_bytes(png_bytes(np.full((24, 24, 3), 90, np.uint8), fmt="JPEG"))
    argv = ["protect", str(src), str(out), *FAST, "--chunk-size", "2", "--jpeg-as", "png"]

    monkeypatch.setenv("MIMICSHIELD_FAULT", "write-enospc:b")
    assert main(argv) == STORAGE_EXIT
    line = one_error_line(capsys)
    assert line == (f"mimicshield: error: no space left on device while writing {out / 'b.png'}; free space and "
                    "rerun the same command to resume (what was committed is kept)")
    (out / ".b.png.0123abcd.tmp").write_bytes(b"left by a killed run")

    monkeypatch.delenv("MIMICSHIELD_FAULT")
    assert main(argv) == 0, capsys.readouterr().err
    files = sorted(p.name for p in out.iterdir())
    assert files == sorted(["a.png", "b.png", f"{long_stem}.png", f"{too_long}.png", "tables"])  # no temp files
    errors = pq.read_table(out / "tables" / "errors").to_pylist()
    assert [(e["key"], e["stage"]) for e in errors] == [(f"{too_long}.jpg", "write")]
    assert "output name too long" in errors[0]["reason"]
