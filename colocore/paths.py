"""Where a node listens and what it writes: the one address rule, private unix sockets,
files written without following what a stranger may have planted.

Every package may import this module (like errors.py): the migration channel, the
chardevs and the snapshot writer all go through it, so the rules are written once.

The address rule: `tcp::PORT` (an empty host) means loopback, 127.0.0.1, for every
listener (monitor, QMP, console, --incoming). A careful operator exposes a port on purpose:
`tcp:0.0.0.0:PORT` (or a given address) does it, and a listener that is reachable from
other hosts without TLS says so in one warning line at start.
"""
import ipaddress
import os
import socket
import stat
import tempfile

from colocore.errors import ColocoreError

DEFAULT_HOST = "127.0.0.1"
SOCKET_MODE = 0o600          # unix sockets: the owner only, whatever the umask


def parse_host_port(rest, what):
    """HOST:PORT (HOST may be empty, a name, an IPv4 address or [IPv6]) -> (host, port).
    An empty host is loopback (see the module doc); port 0 is allowed (any free port)."""
    host, sep, port = rest.rpartition(":")
    if not sep:
        raise ColocoreError("%s: expected HOST:PORT, got %r" % (what, rest))
    try:
        port_no = int(port)
    except ValueError:
        raise ColocoreError("%s: port %r is not a number" % (what, port)) from None
    if not 0 <= port_no <= 65535:
        raise ColocoreError("%s: port %d out of range 0-65535" % (what, port_no))
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host or DEFAULT_HOST, port_no


def is_loopback(host):
    if host in ("localhost", "localhost.localdomain"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False          # a name: it may resolve to anything


def warn_if_exposed(log, what, host, port, tls):
    """The one warning line of a listener that other hosts can reach without TLS."""
    if tls or is_loopback(host):
        return
    who = "every host that can route to this one" if host in ("0.0.0.0", "::") \
        else "every host that can reach %s" % host
    log.warning("%s listens on %s:%d without TLS: %s can connect; use a loopback address, "
                "or tls-creds (see README, 'Trust')", what, host, port, who)


# ---- unix sockets ------------------------------------------------------------------------

def clear_stale_socket(path, what):
    """Make room for a unix socket at `path`: nothing there is fine; a socket nobody
    serves any more is removed; a live socket, or anything that is not a socket (a file, a
    directory, a symlink), is an error and is left alone."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise ColocoreError("%s unix:%s: %s" % (what, path, exc.strerror or exc)) from None
    if not stat.S_ISSOCK(st.st_mode):
        raise ColocoreError("%s unix:%s: the path exists and is not a socket; colocore "
                            "removes only a stale socket: remove it yourself or pick "
                            "another path" % (what, path))
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(0.5)
        probe.connect(path)
    except OSError:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        return
    finally:
        probe.close()
    raise ColocoreError("%s unix:%s: another process is serving this socket; stop it or "
                        "pick another path" % (what, path))


def bind_unix(path, what, mode=SOCKET_MODE):
    """A bound (not yet listening) unix socket at `path`, with `mode` whatever the umask.

    The socket is bound in a private (0700) directory beside `path`, given its mode there
    and then hard-linked into place: at no moment can anyone but the owner connect to a
    socket with the umask's mode, and link() never replaces something planted at `path`
    after the stale-socket check (it fails with EEXIST instead)."""
    clear_stale_socket(path, what)
    parent = os.path.dirname(os.path.abspath(path))
    try:
        private = _private_dir(parent)
    except OSError as exc:
        raise ColocoreError("%s unix:%s: cannot create a socket in %s: %s"
                            % (what, path, parent, exc.strerror or exc)) from None
    tmp = os.path.join(private, "s")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(tmp)
        os.chmod(tmp, mode)
        os.link(tmp, path)
    except OSError as exc:
        sock.close()
        raise ColocoreError("%s unix:%s: cannot open: %s%s" % (
            what, path, exc.strerror or exc,
            "; something appeared at the path meanwhile" if exc.errno == 17 else "")) from None
    finally:
        for p, rm in ((tmp, os.unlink), (private, os.rmdir)):
            try:
                rm(p)
            except OSError:
                pass
    return sock


def _private_dir(parent):
    return tempfile.mkdtemp(prefix=".colocore-", dir=parent)


def remove_own_socket(path):
    """At close: remove `path` only if it is still a socket (never what replaced it)."""
    try:
        if stat.S_ISSOCK(os.lstat(path).st_mode):
            os.unlink(path)
    except OSError:
        pass


# ---- files written for the operator --------------------------------------------------

def check_target(path, what):
    """A file colocore will replace: nothing there, or a regular file (not a symlink, a
    device, a directory, a fifo). Returns the directory the temporary goes in."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        st = None
    except OSError as exc:
        raise ColocoreError("%s %s: %s" % (what, path, exc.strerror or exc)) from None
    if st is not None and not stat.S_ISREG(st.st_mode):
        kind = "a symlink" if stat.S_ISLNK(st.st_mode) else \
            "a directory" if stat.S_ISDIR(st.st_mode) else \
            "a device" if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode) else "not a regular file"
        raise ColocoreError("%s %s: the target exists and is %s; colocore replaces only a "
                            "regular file: remove it or pick another path" % (what, path, kind))
    return os.path.dirname(os.path.abspath(path))


def open_private_temp(path, what):
    """(file object, temporary path) for writing what will become `path`: created new
    (O_EXCL, O_NOFOLLOW, mode 0600) in the target's directory, so nothing planted there
    is followed or overwritten. `commit_temp` puts it in place."""
    directory = check_target(path, what)
    base = os.path.basename(path)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
    for n in range(100):
        tmp = os.path.join(directory, ".%s.%d.%d.part" % (base, os.getpid(), n))
        try:
            fd = os.open(tmp, flags, 0o600)
        except FileExistsError:
            continue
        except OSError as exc:
            raise ColocoreError("%s %s: cannot create a temporary in %s: %s"
                                % (what, path, directory, exc.strerror or exc)) from None
        return os.fdopen(fd, "wb"), tmp
    raise ColocoreError("%s %s: cannot find a free temporary name in %s" % (what, path, directory))


def commit_temp(tmp, path, what):
    """Replace `path` by the finished temporary; the target is checked again (rename
    replaces a symlink itself, never what it points to, but a directory or device that
    appeared meanwhile is refused)."""
    try:
        check_target(path, what)
        os.replace(tmp, path)
    except BaseException:
        discard_temp(tmp)
        raise


def discard_temp(tmp):
    try:
        os.unlink(tmp)
    except OSError:
        pass


def open_append_nofollow(path, what):
    """A `file:` chardev: append to a regular file, never through a symlink."""
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags, 0o600)
    except OSError as exc:
        hint = "; it is a symlink, which file: chardevs do not follow" if exc.errno == 40 else ""
        raise ColocoreError("%s file:%s: cannot open: %s%s" % (what, path, exc.strerror or exc, hint)) from None
    return os.fdopen(fd, "ab", buffering=0)
