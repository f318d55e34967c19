"""`ccus demo --console`: the demo keeps its broker, sink and agents up, serves the console on
them with a printed operator account, and ends normally (work history printed) on Ctrl-C."""

import re
import signal
import subprocess
import sys
import urllib.parse
import urllib.request
from http.cookiejar import CookieJar
from pathlib import Path

import pytest

from broker.procs import wait_until


@pytest.mark.e2e
def test_demo_console_serves_until_ctrl_c(tmp_path: Path) -> None:
    proc = subprocess.Popen([sys.executable, "-m", "ccus.cli", "demo", "--console", "--data",
                             str(tmp_path / "demo")], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    try:
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("console: http"):
                break
        m = re.match(r"console: (http://\S+)  user (\S+), password (\S+)", lines[-1])
        assert m, "".join(lines)
        url, user, password = m.groups()
        opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(CookieJar()))
        html = ""

        def up() -> bool:
            nonlocal html
            try:
                html = opener.open(url).read().decode()
                return True
            except OSError:
                return False
        wait_until(up, 20, "the console listening")
        token = re.search(r'name="csrf" value="([^"]+)"', html)
        assert token
        r = opener.open(url + "login", urllib.parse.urlencode(
            {"csrf": token.group(1), "user": user, "password": password}).encode())
        assert r.url.endswith("/fleet")
        body = opener.open(url + "sites/13100000000001/work-history?month=2026-11").read().decode()
        # the demo's day: technician 1 in and out, technician 12 forgot to tap out
        assert "07:32-17:08" in body and "07:54-?" in body
    finally:
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
    assert "work history (就業履歴)" in out
