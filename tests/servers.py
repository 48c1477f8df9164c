"""What the browser tests start: a Jupyter server on a free port, and headless Chromium.

tests/test_browser.py (the learner's JupyterLab) and tests/test_formgrader.py (nbgrader's formgrader) both use
them. Neither ever skips: a server that does not come up, or a missing browser, fails the test and says why.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from utils import settings

CHROMIUM = settings.get("COURSE_CHROMIUM")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def jupyter_server(app: str, root: Path, env: dict[str, str], log_path: Path, ready: str,
                   extra: tuple[str, ...] = ()) -> Iterator[dict]:
    """``python -m <app>`` (``jupyterlab``, ``jupyter_server``) serving ``root`` on 127.0.0.1, with a fresh token.

    Waits (90 s at most) until ``GET <base><ready>?token=...`` answers 200, yields ``{"base", "token"}``, and stops
    the server's whole process group at the end (SIGTERM, then SIGKILL after 20 s).
    """
    port, token = free_port(), secrets.token_hex(16)
    cmd = [sys.executable, "-m", app, "--no-browser", "--ServerApp.ip=127.0.0.1", f"--ServerApp.port={port}",
           f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={root}", *extra]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        cmd.append("--allow-root")
    log = open(log_path, "w")
    server = subprocess.Popen(cmd, cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                with urllib.request.urlopen(f"{base}{ready}?token={token}", timeout=5) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"{app} did not start: {' '.join(cmd)}\n{log_path.read_text()[-3000:]}")
            time.sleep(0.5)
        yield {"base": base, "token": token}
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
        log.close()


@contextlib.contextmanager
def chromium() -> Iterator:
    """Headless Chromium (``$COURSE_CHROMIUM``) through playwright; fails with what to install when it cannot."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError as exc:
        pytest.fail(f"playwright is not installed ({exc}): run `make setup` (it installs the playwright package and "
                    "Debian's chromium).")
    if not Path(CHROMIUM).exists():
        pytest.fail(f"No Chromium at {CHROMIUM}: run `make setup` (as root it runs `apt-get install -y chromium`), or "
                    "set COURSE_CHROMIUM to a Chromium or Chrome binary.")
    with sync_playwright() as p:
        try:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"], headless=True)
        except Exception as exc:
            pytest.fail(f"Chromium at {CHROMIUM} did not start: {exc}")
        try:
            yield browser
        finally:
            browser.close()
