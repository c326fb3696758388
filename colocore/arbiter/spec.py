"""`--arbiter etcd:URL,key=KEY[,ttl=MS][,role=serve|standby][,protect=auto|manual][,advertise=tcp:HOST:PORT]`

Spelled like QEMU's option lists: a kind and its address, then `name=value` pairs.
- URL: the etcd client URL, http://HOST:PORT (several members: http://A:2379|http://B:2379).
- key: the service's key; the node that serves holds a lease on it. Its children hold the
  service's history (KEY/state) and the registered standbys (KEY/standby/ID).
- ttl: the lease in milliseconds (default 2000). etcd counts leases in whole seconds, so
  it is a multiple of 1000; a production etcd grants no less than 2000.
- role: serve (default; a node with --kernel, or a COLO secondary) or standby (a node
  with --incoming tcp:... that waits to be picked as a new secondary).
- protect: auto (a node serving alone protects itself onto a registered standby) or
  manual (default; `colo_protect` does it).
- advertise: the address a primary uses to reach this standby (default: its --incoming
  address, which must then not be 0.0.0.0).
"""
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from colocore.errors import ColocoreError

USAGE = ("use --arbiter etcd:http://HOST:PORT,key=KEY[,ttl=MS][,role=serve|standby]"
         "[,protect=auto|manual][,advertise=tcp:HOST:PORT]")


@dataclass
class ArbiterSpec:
    endpoints: list = field(default_factory=list)      # [(host, port), ...]
    key: str = ""
    ttl_ms: int = 2000
    role: str = "serve"
    protect: str = "manual"
    advertise: str = None

    @property
    def ttl_s(self):
        return self.ttl_ms // 1000

    @property
    def url(self):
        return "|".join("http://%s:%d" % ep for ep in self.endpoints)

    @property
    def state_key(self):
        return self.key + "/state"

    @property
    def standby_prefix(self):
        return self.key + "/standby/"

    def text(self):
        s = "etcd:%s,key=%s,ttl=%d,role=%s,protect=%s" % (self.url, self.key, self.ttl_ms,
                                                         self.role, self.protect)
        return s + (",advertise=%s" % self.advertise if self.advertise else "")


def _endpoint(url):
    parts = urlsplit(url)
    if parts.scheme != "http" or not parts.hostname or parts.path not in ("", "/"):
        raise ColocoreError("--arbiter: %r is not an etcd client URL like http://HOST:2379; %s"
                            % (url, USAGE))
    try:
        port = parts.port or 2379
    except ValueError:
        raise ColocoreError("--arbiter: bad port in %r; %s" % (url, USAGE)) from None
    return parts.hostname, port


def parse_arbiter(text):
    kind, sep, rest = str(text).partition(":")
    if kind != "etcd" or not sep:
        raise ColocoreError("--arbiter %r: only etcd is supported; %s" % (text, USAGE))
    url, *options = rest.split(",")
    spec = ArbiterSpec(endpoints=[_endpoint(u) for u in url.split("|")])
    for opt in options:
        name, eq, value = opt.partition("=")
        if not eq or not value:
            raise ColocoreError("--arbiter: %r is not name=value; %s" % (opt, USAGE))
        if name == "key":
            if not value.startswith("/") or value.endswith("/") or "//" in value:
                raise ColocoreError("--arbiter: key=%s: a key is a path like /colocore/kv "
                                    "(leading /, no trailing /)" % value)
            spec.key = value
        elif name == "ttl":
            try:
                ms = int(value)
            except ValueError:
                ms = -1
            if ms < 1000 or ms % 1000:
                raise ColocoreError("--arbiter: ttl=%s: etcd counts leases in whole seconds; "
                                    "give milliseconds, a multiple of 1000 (e.g. ttl=2000)" % value)
            spec.ttl_ms = ms
        elif name == "role":
            if value not in ("serve", "standby"):
                raise ColocoreError("--arbiter: role=%s: use role=serve or role=standby" % value)
            spec.role = value
        elif name == "protect":
            if value not in ("auto", "manual"):
                raise ColocoreError("--arbiter: protect=%s: use protect=auto or protect=manual"
                                    % value)
            spec.protect = value
        elif name == "advertise":
            if not value.startswith("tcp:"):
                raise ColocoreError("--arbiter: advertise=%s: use advertise=tcp:HOST:PORT" % value)
            spec.advertise = value
        else:
            raise ColocoreError("--arbiter: unknown option %r; %s" % (name, USAGE))
    if not spec.key:
        raise ColocoreError("--arbiter: key=KEY is missing; %s" % USAGE)
    return spec
