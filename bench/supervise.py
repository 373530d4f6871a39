#!/usr/bin/env python3
"""bench/supervise.py: the process helper of bench/upgrade.sh (standard library only, Linux).

Both modes make this process a child subreaper (PR_SET_CHILD_SUBREAPER), as a service manager
is: the processes a server double-forks (baton's new generation, nginx's daemon and new master)
come back to it instead of to PID 1. So it sees every one of them exit, with its status, and
the CPU time of the whole tree stays in its /proc/PID/stat (cutime/cstime) for the benchmark.
Every start and exit is appended to LOG as "spawn PID" and "exit PID STATUS" (STATUS: the exit
code, or sigN).

  supervise.py reap LOG -- CMD [ARG...]
      Runs CMD (stdin /dev/null, stdout/stderr inherited) and reaps it and every orphan that
      comes back, until none is left. SIGTERM/SIGINT/SIGHUP: SIGTERM to every child, SIGKILL
      to what is left after --kill-after seconds.

  supervise.py socket LOG HOST:PORT OUTPUT -- CMD [ARG...]
      Binds and listens on HOST:PORT itself, as a socket unit does, and runs CMD with that
      socket as fd 3, LISTEN_FDS=1 and LISTEN_PID=<its pid> (stdout/stderr appended to OUTPUT).
      Reads commands on stdin, answers one line each on stdout:
        start    -> "ok PID MS": started CMD, which answered GET /-/version after MS ms
        restart  -> "ok OLD STATUS NEW GAP_US EXIT_US SPAWN_US": SIGTERM to OLD, waited for it to
                    exit (STATUS), started NEW; GAP_US from the SIGTERM to NEW's answer, EXIT_US
                    from the SIGTERM to OLD's exit, SPAWN_US from NEW's start to its answer
        quit / end of input -> SIGTERM to the server, wait, exit
      Anything that goes wrong: "error MESSAGE".
"""

import ctypes
import json
import os
import select
import signal
import socket
import sys
import time

PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36
_libc = ctypes.CDLL(None, use_errno=True)
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def prctl(option, arg):
    if _libc.prctl(option, ctypes.c_ulong(arg), 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def status_text(status):
    if os.WIFEXITED(status):
        return str(os.WEXITSTATUS(status))
    if os.WIFSIGNALED(status):
        return "sig%d" % os.WTERMSIG(status)
    return "?%d" % status


class Log:
    def __init__(self, path):
        self.file = open(path, "a", buffering=1)

    def __call__(self, *words):
        self.file.write(" ".join(str(w) for w in words) + "\n")


def spawn(argv, listen_fd=None, output=None):
    """fork + exec argv; with listen_fd, that socket becomes fd 3 with LISTEN_FDS/LISTEN_PID."""
    out_fd = os.open(output, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644) if output else None
    pid = os.fork()
    if pid == 0:
        try:
            # Signal state survives exec: undo what this process changed.
            signal.pthread_sigmask(signal.SIG_SETMASK, [])
            for sig in (signal.SIGPIPE, signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
                signal.signal(sig, signal.SIG_DFL)
            prctl(PR_SET_PDEATHSIG, signal.SIGTERM)  # if this helper is killed outright
            null = os.open("/dev/null", os.O_RDONLY)
            os.dup2(null, 0)
            if out_fd is not None:
                os.dup2(out_fd, 1)
                os.dup2(out_fd, 2)
            env = dict(os.environ)
            for name in ("LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES", "LISTEN_PIDFDID"):
                env.pop(name, None)
            if listen_fd is not None:
                if listen_fd == 3:
                    os.set_inheritable(3, True)
                else:
                    os.dup2(listen_fd, 3)  # inheritable
                env["LISTEN_FDS"] = "1"
                env["LISTEN_PID"] = str(os.getpid())  # this pid is the server's after exec
                os.closerange(4, 1 << 16)
            else:
                os.closerange(3, 1 << 16)
            os.execvpe(argv[0], argv, env)
        except BaseException as e:  # noqa: BLE001 - report anything, then leave
            os.write(2, ("supervise.py: cannot run %s: %s\n" % (argv[0], e)).encode())
        os._exit(127)
    if out_fd is not None:
        os.close(out_fd)
    return pid


def children():
    """Pids whose parent is this process (orphans that came back included)."""
    me, found = os.getpid(), []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open("/proc/%s/stat" % name) as f:
                line = f.read()
        except OSError:
            continue
        fields = line[line.rfind(")") + 2:].split()
        if len(fields) > 1 and int(fields[1]) == me:
            found.append(int(name))
    return found


def reap_all(log):
    """Reaps every exited child without blocking; False when there are no children left."""
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return False
        if pid == 0:
            return True
        log("exit", pid, status_text(status))


def signal_children(sig):
    for pid in children():
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def cmd_reap(log_path, argv, kill_after):
    log = Log(log_path)
    prctl(PR_SET_CHILD_SUBREAPER, 1)
    watched = (signal.SIGCHLD,) + STOP_SIGNALS
    signal.pthread_sigmask(signal.SIG_BLOCK, watched)
    log("spawn", spawn(argv))
    kill_at = None
    while reap_all(log):
        timeout = 1.0 if kill_at is None else max(0.0, kill_at - time.monotonic())
        info = signal.sigtimedwait(watched, timeout)
        if info is not None and info.si_signo in STOP_SIGNALS and kill_at is None:
            signal_children(signal.SIGTERM)
            kill_at = time.monotonic() + kill_after
        if kill_at is not None and time.monotonic() >= kill_at:
            # What is left after the grace time, and its orphans as they come back.
            signal_children(signal.SIGKILL)
            kill_at = time.monotonic() + 0.1
    return 0


class Stop(Exception):
    pass


def _stop(signo, _frame):
    raise Stop("signal %d" % signo)


def ask_version(port_addr, pid, deadline):
    """GET /-/version over a fresh connection; waits for the answer while pid is alive."""
    conn = socket.create_connection(port_addr, timeout=5)
    try:
        conn.sendall(b"GET /-/version HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n")
        conn.setblocking(False)
        data = b""
        while True:
            ready, _, _ = select.select([conn], [], [], 0.002)
            if ready:
                chunk = conn.recv(65536)
                if not chunk:
                    break
                data += chunk
                continue
            if time.monotonic() > deadline:
                raise RuntimeError("no answer from pid %d within the deadline" % pid)
            try:
                done, status = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                done, status = pid, 0
            if done == pid:
                raise RuntimeError("pid %d exited (%s) before answering" % (pid, status_text(status)))
    finally:
        conn.close()
    head, _, body = data.partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 200"):
        raise RuntimeError("GET /-/version answered %r" % head[:60])
    answered = json.loads(body).get("pid")
    if answered != pid:
        raise RuntimeError("GET /-/version answered by pid %s, want %d" % (answered, pid))


def cmd_socket(log_path, addr, output, argv, kill_after):
    log = Log(log_path)
    prctl(PR_SET_CHILD_SUBREAPER, 1)
    host, _, port = addr.rpartition(":")
    port_addr = (host, int(port))
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(port_addr)
    sock.listen(4096)  # systemd's Backlog= default (SOMAXCONN)
    for sig in STOP_SIGNALS:
        signal.signal(sig, _stop)
    current = None

    def start():
        pid = spawn(argv, listen_fd=sock.fileno(), output=output)
        log("spawn", pid)
        return pid

    def wait_exit(pid, deadline):
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done == pid:
                log("exit", pid, status_text(status))
                return status_text(status)
            if time.monotonic() > deadline:
                os.kill(pid, signal.SIGKILL)
                done, status = os.waitpid(pid, 0)
                log("exit", pid, status_text(status))
                return "killed-after-%gs:%s" % (kill_after, status_text(status))
            time.sleep(0.0005)

    def answer(line):
        sys.stdout.write(line + "\n")
        sys.stdout.flush()

    try:
        for line in sys.stdin:
            word = line.strip()
            try:
                if word == "start" and current is None:
                    t0 = time.monotonic()
                    current = start()
                    ask_version(port_addr, current, t0 + 10)
                    answer("ok %d %.3f" % (current, (time.monotonic() - t0) * 1e3))
                elif word == "restart" and current is not None:
                    old = current
                    t0 = time.monotonic()
                    os.kill(old, signal.SIGTERM)
                    status = wait_exit(old, t0 + kill_after)
                    t1 = time.monotonic()
                    current = None
                    current = start()
                    t2 = time.monotonic()
                    ask_version(port_addr, current, t2 + 10)
                    t3 = time.monotonic()
                    answer("ok %d %s %d %d %d %d" % (old, status, current, (t3 - t0) * 1e6,
                                                     (t1 - t0) * 1e6, (t3 - t2) * 1e6))
                elif word == "quit":
                    break
                else:
                    answer("error unexpected command %r" % word)
                reap_all(log)  # nothing else should be there; log it if it is
            except (OSError, RuntimeError, ValueError) as e:
                answer("error %s" % e)
    except Stop:
        pass
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if current is not None:
            try:
                os.kill(current, signal.SIGTERM)
                wait_exit(current, time.monotonic() + kill_after)
            except (ProcessLookupError, ChildProcessError):
                pass
        signal_children(signal.SIGKILL)
        while reap_all(log):
            time.sleep(0.01)
    return 0


def main(args):
    kill_after = float(os.environ.get("SUPERVISE_KILL_AFTER", "10"))
    if "--" not in args or len(args) < 3:
        sys.exit(__doc__)
    sep = args.index("--")
    head, argv = args[:sep], args[sep + 1:]
    if head[:1] == ["reap"] and len(head) == 2 and argv:
        return cmd_reap(head[1], argv, kill_after)
    if head[:1] == ["socket"] and len(head) == 4 and argv:
        return cmd_socket(head[1], head[2], head[3], argv, kill_after)
    sys.exit(__doc__)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
