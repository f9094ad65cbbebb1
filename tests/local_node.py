"""This machine as a cluster node for a real `ray up` (tests/test_ray_up.py).

`ray up` reaches its nodes over SSH, so the test gives it one: an unprivileged user of its own
(its `ray stop` can end only that user's processes, never the suite's or anyone else's Ray), a
throwaway key pair, and an sshd of Debian's openssh-server listening on loopback only, on a free
port. Ray's cluster launcher has no SSH port setting, so its ProxyCommand is `relay` below (run as
`python tests/local_node.py relay PORT`): it joins ssh's stdin/stdout to that port.

Creating the user and starting sshd need root; as another user each privileged step goes
through sudo, as scripts/chromium.sh does.
"""

from __future__ import annotations

import os
import select
import shlex
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SSHD = "/usr/sbin/sshd"


def as_root(argv: list[str]) -> list[str]:
    return argv if os.geteuid() == 0 else ["sudo", "-n", *argv]


def run_as_root(argv: list[str], **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(as_root(argv), check=True, capture_output=True, text=True, **kwargs)


def ensure_user(name: str) -> Path:
    """An unprivileged login user `name` with a home directory (created once, kept between runs:
    its home holds the node's virtual environment, as a cloud node's disk would)."""
    if subprocess.run(["id", "-u", name], capture_output=True).returncode != 0:
        run_as_root(["useradd", "--create-home", "--shell", "/bin/bash", name])
    # password '*': no password login, yet not a locked account ('!'), which sshd without PAM refuses
    run_as_root(["usermod", "--password", "*", name])
    home = Path(f"/home/{name}")
    run_as_root(["install", "-d", "-o", name, "-g", name, "-m", "700", str(home / ".ssh")])
    return home


def install_file(user: str, text: str, destination: str, mode: str = "600") -> None:
    """Write `text` to `destination` (parents created), owned by `user`."""
    with tempfile.NamedTemporaryFile("w", delete=False, encoding="utf-8") as handle:
        handle.write(text)
    try:
        os.chmod(handle.name, 0o644)
        run_as_root(["install", "-D", "-o", user, "-g", user, "-m", mode, handle.name, destination])
    finally:
        os.unlink(handle.name)


def user_processes(user: str) -> list[str]:
    """`pid command` of every process `user` runs now."""
    out = subprocess.run(["ps", "-ww", "-u", user, "-o", "pid=,args="], capture_output=True, text=True)
    return [line.strip() for line in out.stdout.splitlines() if line.strip()]


def kill_user_processes(user: str) -> None:
    """SIGKILL each process of the test's own user, by id."""
    for line in user_processes(user):
        subprocess.run(as_root(["kill", "-KILL", line.split()[0]]), capture_output=True)


def keygen(path: Path) -> Path:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "senmon-ray-up-test", "-f", str(path)],
                   check=True, capture_output=True)
    return path


class Sshd:
    """sshd on 127.0.0.1:`port` that lets `user` in with the one key in its authorized_keys."""

    def __init__(self, workdir: Path, user: str, port: int):
        self.workdir, self.user, self.port = workdir, user, port
        self.process: subprocess.Popen | None = None
        self.log = workdir / "sshd.log"

    def start(self, timeout_s: float = 30.0) -> "Sshd":
        host_key = keygen(self.workdir / "ssh_host_ed25519_key")
        config = self.workdir / "sshd_config"
        config.write_text("\n".join([
            f"Port {self.port}", "ListenAddress 127.0.0.1", f"HostKey {host_key}",
            f"PidFile {self.workdir / 'sshd.pid'}", f"AllowUsers {self.user}",
            "AuthenticationMethods publickey", "PubkeyAuthentication yes", "PasswordAuthentication no",
            "KbdInteractiveAuthentication no", "UsePAM no", "PermitRootLogin no", "X11Forwarding no",
            "PrintMotd no", "StrictModes yes", "MaxSessions 64", "MaxStartups 64:30:128", "LogLevel VERBOSE", "",
        ]))
        run_as_root(["mkdir", "-p", "-m", "0755", "/run/sshd"])  # sshd's privilege separation directory
        run_as_root([SSHD, "-t", "-f", str(config)])  # a bad config fails here, with sshd's message
        self.process = subprocess.Popen(as_root([SSHD, "-D", "-f", str(config), "-E", str(self.log)]),
                                        stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"sshd exited with {self.process.returncode}: {self.log.read_text()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1) as conn:
                    if conn.recv(64).startswith(b"SSH-"):
                        return self
            except OSError:
                time.sleep(0.1)
        raise RuntimeError(f"sshd did not answer on 127.0.0.1:{self.port} within {timeout_s:.0f} s")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()  # the listener; each session's own sshd ends with its connection
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        self.process = None

    def proxy_command(self) -> str:
        return f"{shlex.quote(sys.executable)} {shlex.quote(str(Path(__file__).resolve()))} relay {self.port}"


def relay(port: int) -> None:
    """ssh's ProxyCommand: copy stdin to 127.0.0.1:`port` and the answers to stdout until either side ends."""
    sock = socket.create_connection(("127.0.0.1", port))
    reading = [sys.stdin.fileno(), sock]
    while True:
        ready, _, _ = select.select(reading, [], [])
        if sock in ready:
            data = sock.recv(65536)
            if not data:
                return
            view = memoryview(data)
            while view:
                view = view[os.write(sys.stdout.fileno(), view):]
        if sys.stdin.fileno() in ready:
            data = os.read(sys.stdin.fileno(), 65536)
            if data:
                sock.sendall(data)
            else:
                sock.shutdown(socket.SHUT_WR)
                reading.remove(sys.stdin.fileno())


if __name__ == "__main__" and sys.argv[1:2] == ["relay"]:
    relay(int(sys.argv[2]))
