"""The scripts copy their plumbing (data, checkpoints, logging, errors) so that each file runs alone.
These tests fail as soon as one copy drifts from the others: a fix must be made in every script."""
import difflib

import pytest

from common import REPO

MARKER = "# %% Plumbing shared by every script"
SCRIPTS = sorted(p.name for p in REPO.glob("*.py"))


def shared_part(name):
    text = (REPO / name).read_text()
    assert text.count(MARKER) == 1, f"{name} must have exactly one line starting with {MARKER!r}"
    return text[text.index(MARKER):]


def import_block(name):
    """The imports, from '# %% Imports' to the line that names the script: the shared part needs them."""
    text = (REPO / name).read_text()
    return text[text.index("# %% Imports"):text.index("SCRIPT = ")]


def test_every_script_is_found():
    assert {"dcgan.py", "vanilla_gan.py"} <= set(SCRIPTS)


@pytest.mark.parametrize("part", [shared_part, import_block], ids=["plumbing", "imports"])
@pytest.mark.parametrize("name", [s for s in SCRIPTS if s != "dcgan.py"])
def test_copy_matches_dcgan(name, part):
    reference, copy = part("dcgan.py"), part(name)
    diff = "".join(difflib.unified_diff(reference.splitlines(True), copy.splitlines(True), "dcgan.py", name, n=1))
    assert copy == reference, f"{name} differs from dcgan.py in the shared code; make the change in both:\n{diff}"
