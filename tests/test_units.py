"""The systemd units in etc/: `systemd-analyze verify` accepts them without a single complaint."""
from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ETC = Path(__file__).resolve().parent.parent / "etc"
#: where the units expect the installed twistd; the test points them at this checkout's
INSTALLED_TWISTD = "/opt/questsig/bin/twistd"


def unit(name: str) -> str:
    return (ETC / name).read_text()


def verify(tmp_path: Path, files: dict[str, str]) -> str:
    """``systemd-analyze verify`` on the units as written, ExecStart aside: every complaint."""
    for name, text in files.items():
        assert INSTALLED_TWISTD in text or name.endswith(".socket"), name
        twistd = str(Path(sys.executable).with_name("twistd"))
        (tmp_path / name).write_text(text.replace(INSTALLED_TWISTD, twistd))
    done = subprocess.run(["systemd-analyze", "verify", "--man=no",
                           *(str(tmp_path / name) for name in files)],
                          capture_output=True, text=True, timeout=60)
    complaints = (done.stdout + done.stderr).strip()
    assert done.returncode == 0, complaints
    return complaints


needs_systemd_analyze = pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                                           reason="systemd-analyze is not installed")


@needs_systemd_analyze
def test_service_and_socket_verify(tmp_path) -> None:
    """questsig.service and questsig.socket pass `systemd-analyze verify` with no warning."""
    assert verify(tmp_path, {"questsig.service": unit("questsig.service"),
                             "questsig.socket": unit("questsig.socket")}) == ""


@needs_systemd_analyze
def test_cluster_template_verifies(tmp_path) -> None:
    """An instance of questsig@.service passes `systemd-analyze verify` with no warning."""
    assert verify(tmp_path, {"questsig@8001.service": unit("questsig@.service")}) == ""


def test_units_are_hardened() -> None:
    """Both services restart on failure, reload on SIGHUP and run sandboxed."""
    for name in ("questsig.service", "questsig@.service"):
        text = unit(name)
        for line in ("Restart=on-failure", "NoNewPrivileges=yes", "ProtectSystem=strict",
                     "DynamicUser=yes", "ExecReload=/bin/kill -HUP $MAINPID"):
            assert re.search(rf"^{re.escape(line)}$", text, re.M), (name, line)
        assert re.search(r"^LimitNOFILE=\d+$", text, re.M), name
        assert re.search(r"^StateDirectory=questsig", text, re.M), name


def test_socket_matches_the_documented_endpoint() -> None:
    """The descriptor name the socket passes is the one its `systemd:` endpoint asks for."""
    text = unit("questsig.socket")
    name = re.search(r"^FileDescriptorName=(\S+)$", text, re.M).group(1)
    endpoint = re.search(r'endpoint = "(systemd:[^"]+)"', text).group(1)
    assert f":name={name}" in endpoint
    from questsig.listeners import endpoint_problem

    assert endpoint_problem(endpoint) is None
