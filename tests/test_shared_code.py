"""The eight scripts carry one plumbing block so that each file runs alone; dcgan.py holds the
source copy and `python tests/sync_plumbing.py` writes it into the others. These tests fail as soon
as a copy drifts, with the command that fixes it."""
import shutil
import subprocess
import sys

import pytest
import sync_plumbing  # tests/ is on sys.path, as for common
from common import REPO


def test_every_copy_is_the_source_copy():
    stale = sync_plumbing.stale_copies()
    if stale:
        pytest.fail(f"the shared plumbing of {', '.join(stale)} differs from dcgan.py's; run: "
                    f"{sync_plumbing.COMMAND}", pytrace=False)


def test_a_change_to_the_source_is_caught_and_copied(tmp_path):
    """Acceptance of the 'Minimal scripts' issue: one changed line in dcgan.py's block fails the
    check, which names the command; after the command, every copy has the change."""
    (tmp_path / "tests").mkdir()
    shutil.copy(REPO / "tests" / "sync_plumbing.py", tmp_path / "tests")
    for name in sync_plumbing.SCRIPTS:
        shutil.copy(REPO / name, tmp_path / name)
    source = (tmp_path / "dcgan.py").read_text()
    line = "def warn(msg):\n"
    assert source.count(line) == 1
    (tmp_path / "dcgan.py").write_text(source.replace(line, "def warn(msg):  # changed\n"))

    def sync(*flags):
        return subprocess.run([sys.executable, "tests/sync_plumbing.py", *flags], cwd=tmp_path,
                              capture_output=True, text=True)

    check = sync("--check")
    assert check.returncode == 1 and "python tests/sync_plumbing.py" in check.stdout
    assert "wgan_gp.py" in check.stdout and "dcgan.py," not in check.stdout
    assert sync().returncode == 0
    assert sync("--check").returncode == 0
    for name in sync_plumbing.SCRIPTS:
        assert "def warn(msg):  # changed\n" in (tmp_path / name).read_text(), name
