"""The sample systemd unit for donors (docs/allmende-serve.service): systemd itself
accepts it with no warning, and the binary accepts its command line."""

import re
import shlex
import shutil
import subprocess

import pytest

from conftest import BINARY, ROOT

UNIT = ROOT / "docs" / "allmende-serve.service"


def installed_copy(tmp_path):
    """The unit as installed, with ExecStart pointing at the binary built here."""
    text = UNIT.read_text().replace("/usr/local/bin/allmende", str(BINARY))
    path = tmp_path / "allmende-serve.service"
    path.write_text(text)
    return path


@pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                    reason="systemd-analyze is not installed on this machine")
def test_systemd_accepts_the_unit(tmp_path):
    out = subprocess.run(["systemd-analyze", "verify", str(installed_copy(tmp_path))],
                         capture_output=True, text=True)
    # verify exits 0 on ignored keys and bad values too; they show up as messages.
    assert out.returncode == 0 and not out.stderr.strip() and not out.stdout.strip(), \
        out.stdout + out.stderr


def test_the_units_command_line_is_one_the_binary_accepts():
    exec_start = re.search(r"^ExecStart=(.*)$", UNIT.read_text(), re.M).group(1)
    words = [w for w in shlex.split(exec_start) if not w.startswith("$")]
    assert words[0] == "/usr/local/bin/allmende"
    # Flags are checked in order; --help at the end prints help only if all parsed.
    out = subprocess.run([str(BINARY), *words[1:], "--help"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "Donate compute" in out.stdout or "--layers" in out.stdout
