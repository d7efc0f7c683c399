"""Running generated code: each candidate in a subprocess of its own, never in the process that serves or evaluates.

What it does:
- a new session (process group), killed as a group at the deadline;
- rlimits on CPU time, address space, file size and open files, and on processes where the kernel enforces
  them (run as root, the candidate drops to ``nobody`` so that the process limit applies);
- an empty temporary working directory, removed afterwards, and a scrubbed environment (``python -I``);
- no network where a network namespace can be made (as root, or with unprivileged user namespaces), else a
  warning, once.

What it does not protect against (this is not a security sandbox, as evalplus says of its own guard): the
candidate reads whatever files its user may read, shares the kernel, the /tmp of the machine and its other
namespaces (PIDs, mounts, IPC), can use the CPU of other cores until its CPU limit, and a kernel bug is a way
out. Run untrusted models' code in a VM or container as well.
"""

from __future__ import annotations

import ctypes
import logging
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

log = logging.getLogger("codellm.eval")

PASSED, FAILED, TIMED_OUT, CRASHED = "passed", "failed", "timed out", "crashed"
_CLONE_NEWNET, _CLONE_NEWUSER = 0x40000000, 0x10000000
_NOBODY = 65534


@dataclass
class Limits:
    seconds: float = 10.0  # wall clock, per candidate
    memory: int = 2 << 30  # address space, bytes
    file_size: int = 16 << 20  # the largest file it may write, bytes
    processes: int = 16  # processes it may start (where enforced)
    open_files: int = 64


@dataclass
class Outcome:
    status: str  # passed | failed | timed out | crashed
    error: str  # the line that names the error ('' when passed)
    seconds: float


_LIBC = ctypes.CDLL(None, use_errno=True)  # loaded here: a forked child of a threaded process must not dlopen


def _unshare(flags: int) -> bool:
    return _LIBC.unshare(flags) == 0


@dataclass(frozen=True)
class Plan:
    """How candidates run on this machine, found once by trying."""

    python: str
    as_nobody: bool  # root drops to nobody: its files are out of reach and the process limit applies
    network: bool  # a network namespace of its own


def _isolate_network() -> None:
    if not _unshare(_CLONE_NEWNET):
        _unshare(_CLONE_NEWUSER | _CLONE_NEWNET)


def _network_or_exit() -> None:
    if not (_unshare(_CLONE_NEWNET) or _unshare(_CLONE_NEWUSER | _CLONE_NEWNET)):
        os._exit(3)


def _drop_to_nobody() -> None:
    os.setgroups([])
    os.setgid(_NOBODY)
    os.setuid(_NOBODY)


def _tries(python: str, setup) -> bool:
    try:
        return subprocess.run([python, "-I", "-c", "pass"], preexec_fn=setup, capture_output=True, timeout=30,
                              cwd="/").returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


_plan: Plan | None = None


def plan() -> Plan:
    global _plan
    if _plan is None:
        python, as_nobody = os.path.realpath(sys.executable), False
        if os.getuid() == 0:
            for candidate in (python, "/usr/bin/python3", "/usr/local/bin/python3"):
                if os.path.exists(candidate) and _tries(candidate, _drop_to_nobody):
                    python, as_nobody = candidate, True
                    break
            else:
                log.warning("no Python that the user nobody can run: candidates run as root in a user namespace, "
                            "and can write to files root owns")
        network = _tries(python, _network_or_exit)
        if not network:
            log.warning("no network namespace can be made here: candidates can reach the network")
        _plan = Plan(python, as_nobody, network)
    return _plan


def _preexec(limits: Limits, how: Plan):
    def setup() -> None:  # runs in the child, between fork and exec
        if how.network:
            _isolate_network()
        if os.getuid() == 0 and not how.as_nobody:  # root ignores RLIMIT_NPROC outside a user namespace
            _unshare(_CLONE_NEWUSER)
        cpu = int(limits.seconds) + 1
        resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu))
        resource.setrlimit(resource.RLIMIT_AS, (limits.memory, limits.memory))
        resource.setrlimit(resource.RLIMIT_FSIZE, (limits.file_size, limits.file_size))
        resource.setrlimit(resource.RLIMIT_NOFILE, (limits.open_files, limits.open_files))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        if how.as_nobody:
            _drop_to_nobody()
        resource.setrlimit(resource.RLIMIT_NPROC, (limits.processes, limits.processes))
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # an oversized write fails with EFBIG instead of a kill
    return setup


def workdir_root() -> str:
    """Where working directories go: the temporary directory, or /tmp where a candidate running as nobody could not
    reach the other (a private TMPDIR)."""
    root = tempfile.gettempdir()
    if plan().as_nobody and not _reachable_by_others(root):
        return "/tmp"
    return root


def _reachable_by_others(path: str) -> bool:
    parts = os.path.abspath(path).split(os.sep)
    return all(os.stat(os.sep.join(parts[:i]) or os.sep).st_mode & 0o001 for i in range(1, len(parts) + 1))


def _error_line(stderr: str) -> str:
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    return lines[-1][:300] if lines else ""


def run(program: str, limits: Limits | None = None) -> Outcome:
    """Run ``program`` (Python source) and say how it went."""
    limits = limits or Limits()
    how = plan()
    workdir = tempfile.mkdtemp(prefix="codellm-eval-", dir=workdir_root())
    try:
        if how.as_nobody:
            os.chown(workdir, _NOBODY, _NOBODY)
        path = os.path.join(workdir, "candidate.py")
        with open(path, "w") as fh:
            fh.write(program)
        os.chmod(path, 0o644)
        env = {"PATH": "/usr/bin:/bin", "HOME": workdir, "TMPDIR": workdir, "LANG": "C.UTF-8", "PYTHONHASHSEED": "0",
               "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
        start = time.perf_counter()
        proc = subprocess.Popen([how.python, "-I", "-B", path], cwd=workdir, env=env, stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True,
                                preexec_fn=_preexec(limits, how))
        try:
            _, err = proc.communicate(timeout=limits.seconds)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            return Outcome(TIMED_OUT, f"no result within {limits.seconds:g} s", time.perf_counter() - start)
        finally:
            _kill_group(proc)  # whatever it left running
        seconds = time.perf_counter() - start
        text = err.decode("utf-8", "replace")
        if proc.returncode == 0:
            return Outcome(PASSED, "", seconds)
        if proc.returncode < 0:
            name = signal.Signals(-proc.returncode).name
            if name in ("SIGXCPU", "SIGKILL") and seconds >= limits.seconds * 0.5:
                return Outcome(TIMED_OUT, f"killed by {name} (CPU limit)", seconds)
            return Outcome(CRASHED, f"killed by {name}", seconds)
        return Outcome(FAILED, _error_line(text) or f"exit code {proc.returncode}", seconds)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        pass
    if proc.stderr:
        proc.stderr.close()
