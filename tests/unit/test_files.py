"""csdm_dist.files: a record is the old file or the new one, never a part, whatever happens while it is written;
the sha256 records name files by."""
import hashlib
import json
import pickle
import signal
import subprocess
import sys
import time

import pytest
import torch

from csdm_dist import files


def test_write_json_and_save_torch_replace_the_file_and_leave_no_temporary(tmp_path):
    path = tmp_path / "results.json"
    files.write_json(path, {"a": 1})
    files.write_json(path, {"a": 2, "b": [1.5]})
    assert json.loads(path.read_text()) == {"a": 2, "b": [1.5]}
    blob = tmp_path / "distilled.pt"
    files.save_torch({"images": torch.arange(6.0).view(2, 3)}, blob)
    assert torch.equal(torch.load(blob)["images"], torch.arange(6.0).view(2, 3))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["distilled.pt", "results.json"]


def test_a_writer_that_fails_half_way_leaves_the_old_file(tmp_path):
    path = tmp_path / "quality.json"
    path.write_text('{"rows": [1, 2, 3]}')

    def half_then_fail(tmp):
        tmp.write_text('{"rows": [1, 2')
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        files.write_atomic(path, half_then_fail)
    with pytest.raises(TypeError):  # not serialisable: fails before anything is written
        files.write_json(path, {"rows": object()})
    assert path.read_text() == '{"rows": [1, 2, 3]}'
    assert [p.name for p in tmp_path.iterdir()] == ["quality.json"]


def test_a_process_killed_while_writing_leaves_the_old_file(tmp_path):
    """SIGKILL (a time limit, an out-of-memory kill) in the middle of a write: the reader sees the old record."""
    path, started = tmp_path / "results.json", tmp_path / "started"
    path.write_text('{"old": true}')
    code = f"""
import time
from pathlib import Path
from csdm_dist import files
def slow(tmp):
    with open(tmp, "w") as f:
        f.write('{{"new": ')
        f.flush()
        Path({str(started)!r}).touch()
        time.sleep(60)
        f.write('true}}')
files.write_atomic(Path({str(path)!r}), slow)
"""
    proc = subprocess.Popen([sys.executable, "-c", code])
    try:
        deadline = time.monotonic() + 60
        while not started.exists():
            assert proc.poll() is None, "the writer exited before it started writing"
            assert time.monotonic() < deadline, "the writer did not start"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert json.loads(path.read_text()) == {"old": True}
    leftovers = [p.name for p in tmp_path.iterdir() if p.name not in ("results.json", "started")]
    assert leftovers == [f".results.json.tmp-{proc.pid}"]  # hidden, named by the writer's pid; never read


def test_sha256_in_blocks_is_the_sha256_of_the_bytes(tmp_path):
    data = torch.randint(0, 256, ((5 << 20) // 2 + 7,), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    path = tmp_path / "blob.bin"  # 2.5 MiB and 7 bytes: two whole 1 MiB blocks and a part
    path.write_bytes(data.numpy().tobytes())
    assert files.file_sha256(path) == hashlib.sha256(path.read_bytes()).hexdigest()
    with open(path, "rb") as f:
        f.seek(100)  # from where the file stands
        assert files.stream_sha256(f) == hashlib.sha256(path.read_bytes()[100:]).hexdigest()
        assert files.stream_sha256(f) == hashlib.sha256(b"").hexdigest()


def test_load_torch_gives_the_contents_and_the_sha256_of_the_same_bytes(tmp_path):
    path = tmp_path / "t.pt"
    x = torch.randn(3, 5, generator=torch.Generator().manual_seed(1))
    written = files.save_torch({"x": x, "name": "first"}, path)
    first = hashlib.sha256(path.read_bytes()).hexdigest()
    assert written == first  # save_torch names the bytes it wrote
    blob, sha = files.load_torch(path, weights_only=True)
    assert sha == first and blob["name"] == "first"
    torch.testing.assert_close(blob["x"], x, rtol=0, atol=0)
    files.save_torch({"x": 2 * x, "name": "second"}, path)  # replaced: a new hash with the new contents
    blob, sha = files.load_torch(path, weights_only=True)
    assert blob["name"] == "second" and sha == hashlib.sha256(path.read_bytes()).hexdigest() != first
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    with pytest.raises(pickle.UnpicklingError):  # torch's own error passes through, for the caller to word
        files.load_torch(tmp_path / "junk.pt", weights_only=True)
