"""The peers section of the benchmark still runs (its quick mode): a smoke test, never a speed
test. It needs no network and no Redis: taskorch serve only, plus Huey with SQLite storage where
the peers' venv (created by a full run of ``scripts/bench.py --peers``) is there."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).parent.parent
BENCH = ROOT / "scripts" / "bench.py"
PEERS_PYTHON = ROOT / ".bench-peers-venv" / "bin" / "python"


def run_peers(tmp_path: Path, systems: str, venv: Path) -> tuple[str, dict]:
    out = tmp_path / "peers.json"
    proc = subprocess.run([sys.executable, str(BENCH), "--peers", "--quick", "--no-install",
                           "--systems", systems, "--peers-venv", str(venv), "--json", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout, json.loads(out.read_text())


@pytest.mark.timeout(360)  # (minutes on a busy machine; the subprocess's timeout guards)
def test_bench_peers_quick_runs_taskorch_and_reports_a_missing_peer(tmp_path: Path) -> None:
    stdout, data = run_peers(tmp_path, "taskorch,taskorch-normal,taskorch-nj,rq",
                             tmp_path / "no-venv")
    assert "| taskorch serve, journal |" in stdout and "x taskorch" in stdout
    # A peer that cannot run is reported as such, with the reason, never skipped silently.
    assert "| RQ, Redis |" in stdout and "not run: no peers venv" in stdout
    assert "rq" in data["not_run"]
    (journal,) = data["peers"]["taskorch"]
    for w in ("W1", "W2", "W3", "W4"):
        assert "error" not in journal["w"][w], (w, journal["w"][w])
    assert journal["w"]["W4"]["accepted"] == 100 and journal["w"]["W4"]["lost"] == 0
    # The journal without an fsync per commit survives the server's SIGKILL as well.
    (normal,) = data["peers"]["taskorch-normal"]
    assert "| taskorch serve, journal, --journal-sync normal |" in stdout
    for w in ("W1", "W2", "W3"):
        assert "error" not in normal["w"][w], (w, normal["w"][w])
    assert normal["w"]["W4"]["accepted"] == 100 and normal["w"]["W4"]["lost"] == 0, normal["w"]
    (no_journal,) = data["peers"]["taskorch-nj"]
    assert no_journal["w"]["W4"] == {"skipped": "not durable"}


@pytest.mark.skipif(not PEERS_PYTHON.exists(),
                    reason="no peers venv (.bench-peers-venv): a full `scripts/bench.py --peers` "
                           "run creates it; the suite never installs the peers")
@pytest.mark.timeout(360)
def test_bench_peers_quick_runs_huey_sqlite(tmp_path: Path) -> None:
    probe = subprocess.run([str(PEERS_PYTHON), "-c", "import huey"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip("huey does not import in the peers venv")
    stdout, data = run_peers(tmp_path, "taskorch,huey-sqlite", PEERS_PYTHON.parent.parent)
    (huey,) = data["peers"]["huey-sqlite"]
    for w in ("W1", "W2", "W3", "W4"):
        assert "error" not in huey["w"][w], (w, huey["w"][w])
    assert "| Huey, SQLite storage |" in stdout


def test_bench_peers_starts_each_taskorch_system_with_its_own_journal_setting(
        tmp_path: Path) -> None:
    """What each taskorch row's server is started with (the command line, not a server):
    only the normal-sync row drops the fsync per commit, and the journal-less row its journal."""
    sys.path.insert(0, str(ROOT / "scripts"))
    from bench.peers.systems import ADAPTERS

    class Recording:
        def popen(self, cmd: list[str], env: dict[str, str], log_path: str) -> Any:
            self.cmd = cmd
            Path(log_path).write_text("listening on")
            return None

    commands = {}
    for name in ("taskorch", "taskorch-normal", "taskorch-nj"):
        recording = Recording()
        system = ADAPTERS[name](recording, str(tmp_path), 2, False)  # type: ignore[arg-type]
        system.sock, system.key = "s.sock", "key"  # (as start() sets them)
        system.start_server()  # type: ignore[attr-defined]
        commands[name] = " ".join(recording.cmd)
    assert "--journal-sync" not in commands["taskorch"] and "--journal " in commands["taskorch"]
    assert "--journal-sync normal" in commands["taskorch-normal"]
    assert "--journal " in commands["taskorch-normal"]
    assert "--no-journal" in commands["taskorch-nj"]
    assert "--journal-sync" not in commands["taskorch-nj"]
