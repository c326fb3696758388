"""`colocore monitor ADDRESS [COMMAND...]`: a client for a node's HMP monitor."""
import sys
import time

from colocore.clients import BufferedClient
from colocore.errors import ColocoreError
from colocore.control.hmp import PROMPT

PROMPT_B = PROMPT.encode()


class MonitorClient(BufferedClient):
    """Blocking HMP client: `cmd(line)` returns the output text without the prompt."""

    def __init__(self, address, timeout=10.0):
        super().__init__(address, timeout)
        self._read_until_prompt()          # banner

    def _read_until_prompt(self, timeout=None):
        deadline = time.monotonic() + (timeout or self.timeout)
        while not self.buf.endswith(PROMPT_B):
            try:
                self._fill(deadline, "the monitor", timeout)
            except ConnectionError:
                raise ColocoreError("the node closed the monitor connection") from None
        text = bytes(self.buf[:-len(PROMPT_B)]).decode("utf-8", "replace")
        self.buf.clear()
        return text.replace("\r\n", "\n")

    def cmd(self, line, timeout=None):
        self.sock.sendall(line.encode() + b"\n")
        out = self._read_until_prompt(timeout)
        return out.rstrip("\n")


def is_error(text):
    return text.startswith("Error:") or text.startswith("unknown command")


def main(args):
    try:
        client = MonitorClient(args.address)
    except ColocoreError as exc:
        print("colocore monitor: %s" % exc, file=sys.stderr)
        return 1
    try:
        if args.command:
            line = " ".join(args.command)
            try:
                out = client.cmd(line, timeout=600)
            except ColocoreError as exc:
                if line.split()[0] in ("quit", "q"):
                    return 0
                print("colocore monitor: %s" % exc, file=sys.stderr)
                return 1
            if out:
                print(out)
            return 1 if is_error(out) else 0
        return _interactive(client)
    finally:
        client.close()


def _interactive(client):
    try:
        import readline  # noqa: F401 - history and line editing for input()
    except ImportError:
        pass
    while True:
        try:
            line = input(PROMPT)
        except EOFError:
            print()
            return 0
        if not line.strip():
            continue
        try:
            out = client.cmd(line, timeout=600)
        except ColocoreError as exc:
            print(exc)
            return 0 if line.split()[0] in ("quit", "q") else 1
        if out:
            print(out)
