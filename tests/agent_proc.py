"""Real `ccus agent` processes for the cluster tests: a gate agent with one nfcpy reader on an
emulated-card field, tapping cards from a thread, its [mqtt] table given by the test (3.1.1,
several brokers, short timing), its log in a file the test can read (which broker it is on).

Every tap the field makes is read by nfcpy in the agent process, decided against the static
list and kept in the agent's outbox until the sink's end-to-end acknowledgement: the store must
end up with seqs 1..n of the device, once each, n = the agent's next_seq - 1.
"""

import re
import signal
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path

from demo.site_day import card_of, write_idlist_csv
from edge.idlist import Entry, Status
from sim.agent_config import gate_agent_toml
from sim.nfc_card import CardField, free_udp_port

ROOT = Path(__file__).resolve().parents[1]
CARDS = 40        # cards 0..CARDS-1, each on the list; a tap takes the next one (no retap window)
FAST = {"keepalive_s": 5, "reconnect_min_s": 0.2, "reconnect_max_s": 1.0,
        "reconnect_fast_max_s": 1.0, "ack_timeout_s": 3.0, "state_interval_s": 5.0}


def _toml_value(v: object) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return f'"{v}"'
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    return str(v)


class TappingAgent:
    """``a = TappingAgent(tmp, "gate-01", site, protocol="3.1.1", brokers=[...]); a.start();
    a.tap_for(5); a.stop()``; ``a.broker_port()``: the port of its last connection."""

    def __init__(self, tmp: Path, dev: str, site: str, **mqtt: object) -> None:
        self.dev, self.site = dev, site
        self.dir = tmp / dev
        self.dir.mkdir(parents=True, exist_ok=True)
        self.udp = free_udp_port()
        write_idlist_csv(self.dir / "list.csv", [Entry(f"{10000000000000 + i:014d}",
                                                       Status.ACTIVE, cards=(card_of(i).ident,))
                                                 for i in range(CARDS)])
        text = gate_agent_toml(dev=dev, site=site, data_dir=self.dir / "data", host="127.0.0.1",
                               port=1, list_path=self.dir / "list.csv", udp_port=self.udp)
        keys = {**FAST, **mqtt}
        extra = "".join(f"{k} = {_toml_value(v)}\n" for k, v in keys.items())
        text = text.replace("tls = false\n", "tls = false\n" + extra, 1)
        text = text.replace('targets = ["212F"]', 'targets = ["212F"]\nretap_window_s = 0.0')
        self.conf = self.dir / "agent.toml"
        self.conf.write_text(text)
        self.log = self.dir / "agent.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.field: CardField | None = None
        self.taps = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> "TappingAgent":
        self.field = CardField(self.udp)
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "ccus.cli", "agent", "--config",
                                          str(self.conf)], cwd=ROOT, stdout=log,
                                         stderr=subprocess.STDOUT)
        return self

    def tap(self) -> bool:
        assert self.field is not None
        ok = self.field.tap(card_of(self.taps % CARDS), hold_s=None, timeout_s=10)
        if ok:
            self.taps += 1
        return ok

    def tap_in_background(self, until: int) -> None:
        """Tap from a thread until `until` taps were made (or stop_tapping())."""
        def run() -> None:
            while not self._stop.is_set() and self.taps < until:
                self.tap()
        self._thread = threading.Thread(target=run, name=f"taps-{self.dev}", daemon=True)
        self._thread.start()

    def wait_tapping(self, timeout: float = 60) -> None:
        """Until the background taps are all made."""
        if self._thread is not None:
            self._thread.join(timeout)

    def stop_tapping(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(15)

    def log_text(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except OSError:
            return ""

    def broker_port(self) -> int | None:
        """The port of the broker the agent last connected to (from its log)."""
        found = re.findall(r"mqtt: connected to [^ ]+:(\d+)", self.log_text())
        return int(found[-1]) if found else None

    def downtimes(self) -> list[float]:
        """Seconds down of each reconnection, from the link's "connected ... again after" lines."""
        return [float(x) for x in re.findall(r"again after ([\d.]+) s down", self.log_text())]

    def made(self) -> int:
        """The agent's next_seq - 1: how many touches it has made (read from its outbox)."""
        db = sqlite3.connect(self.dir / "data" / "outbox.sqlite", timeout=10)
        try:
            row = db.execute("SELECT v FROM meta WHERE k = 'next_seq'").fetchone()
            return int(row[0]) - 1 if row else 0
        finally:
            db.close()

    def backlog(self) -> int:
        db = sqlite3.connect(self.dir / "data" / "outbox.sqlite", timeout=10)
        try:
            return int(db.execute("SELECT COUNT(*) FROM outbox").fetchone()[0])
        finally:
            db.close()

    def stop(self) -> int:
        """SIGTERM the agent; its exit code."""
        self.stop_tapping()
        rc = 0
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                rc = self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                rc = self.proc.wait(5)
        elif self.proc is not None:
            rc = self.proc.returncode
        if self.field is not None:
            self.field.close()
            self.field = None
        return rc


def stored_seqs(db_path: Path) -> dict[str, list[int]]:
    """device -> its stored seqs in order (SQLite store)."""
    db = sqlite3.connect(db_path, timeout=10)
    try:
        out: dict[str, list[int]] = {}
        for dev, seq in db.execute("SELECT device, seq FROM touches ORDER BY device, seq"):
            out.setdefault(dev, []).append(seq)
        return out
    finally:
        db.close()


def all_stored_once(agents: list[TappingAgent], db_path: Path) -> None:
    """Every agent made touches, and the store holds seqs 1..n of each, once each."""
    made = {a.dev: a.made() for a in agents}
    assert all(made.values()), made
    assert stored_seqs(db_path) == {dev: list(range(1, n + 1)) for dev, n in made.items()}
