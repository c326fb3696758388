"""The etcd side, through etcd3gw (etcd's v3 JSON gateway, plain HTTP).

Why etcd3gw: it is synchronous, so the arbiter runs it on its own thread and nothing on
the control loop or the checkpoint path ever waits for etcd; every request carries a
timeout, so "etcd unreachable" is a bounded, observable state; it needs only requests
(no grpcio/protobuf wheels); it talks to Debian's etcd 3.4 as shipped; and it hands us the
raw Txn, so a takeover is exactly one transaction with our own compares. aetcd (asyncio,
gRPC) would put etcd's latencies on an event loop we use for monitors and chardevs.

Each thread gets its own HTTP session (requests' sessions are not thread safe). Several
endpoints (members of one cluster) are tried in turn.
"""
import base64
import json
import threading

import etcd3gw
from etcd3gw import exceptions as etcd_exc

from colocore.errors import ColocoreError


class EtcdUnreachable(ColocoreError):
    """No member answered in time: nothing is known about the lease or the key."""


class EtcdError(ColocoreError):
    """etcd answered with an error (a bad request, not a network problem)."""


def _b64(text):
    if isinstance(text, str):
        text = text.encode()
    return base64.b64encode(text).decode()


def _unb64(text):
    return base64.b64decode(text) if text else b""


class KeyValue:
    """One key as etcd reports it."""

    def __init__(self, raw):
        self.key = _unb64(raw.get("key")).decode()
        self.value = _unb64(raw.get("value"))
        self.create_revision = int(raw.get("create_revision", 0))
        self.mod_revision = int(raw.get("mod_revision", 0))
        self.lease = int(raw.get("lease", 0))

    def json(self):
        try:
            return json.loads(self.value.decode())
        except (UnicodeDecodeError, ValueError):
            return {}


# ---- compares and requests of a transaction, in the gateway's JSON -------------------

def absent(key):
    return {"key": _b64(key), "result": "EQUAL", "target": "CREATE", "create_revision": 0}


def mod_revision_is(key, revision):
    """revision 0 means: the key does not exist."""
    return {"key": _b64(key), "result": "EQUAL", "target": "MOD", "mod_revision": int(revision)}


def lease_is(key, lease_id):
    return {"key": _b64(key), "result": "EQUAL", "target": "LEASE", "lease": int(lease_id)}


def put(key, value, lease_id=0):
    req = {"key": _b64(key), "value": _b64(value if isinstance(value, (str, bytes))
                                            else json.dumps(value, sort_keys=True))}
    if lease_id:
        req["lease"] = int(lease_id)
    return {"request_put": req}


def delete(key):
    return {"request_delete_range": {"key": _b64(key)}}


def get(key):
    return {"request_range": {"key": _b64(key)}}


class Etcd:
    def __init__(self, endpoints, timeout):
        self.endpoints = list(endpoints)
        self.timeout = timeout
        self._local = threading.local()
        self._preferred = 0

    def _clients(self):
        clients = getattr(self._local, "clients", None)
        if clients is None:
            clients = [etcd3gw.Etcd3Client(host=h, port=p, timeout=self.timeout, api_path="/v3/")
                       for h, p in self.endpoints]
            self._local.clients = clients
        return clients

    def _post(self, path, payload):
        clients = self._clients()
        n = len(clients)
        errors = []
        for k in range(n):
            i = (self._preferred + k) % n
            c = clients[i]
            try:
                result = c.post(c.get_url(path), json=payload)
                self._preferred = i
                return result
            except (etcd_exc.ConnectionFailedError, etcd_exc.ConnectionTimeoutError,
                    etcd_exc.InternalServerError) as exc:
                errors.append("%s:%d: %s" % (c.host, c.port, type(exc).__name__))
            except etcd_exc.Etcd3Exception as exc:
                raise EtcdError("etcd refused %s: %s" % (path, exc.detail_text or exc)) from None
        raise EtcdUnreachable("etcd unreachable (%s)" % "; ".join(errors))

    # ---- leases --------------------------------------------------------------------

    def grant(self, ttl_s):
        """A new lease; returns (id, granted ttl in seconds: etcd may round up)."""
        r = self._post("/lease/grant", {"TTL": int(ttl_s), "ID": 0})
        if r.get("error"):
            raise EtcdError("etcd refused a lease: %s" % r["error"])
        return int(r["ID"]), int(r["TTL"])

    def keepalive(self, lease_id):
        """Refresh a lease; its new TTL in seconds, or -1 when it no longer exists."""
        r = self._post("/lease/keepalive", {"ID": int(lease_id)})
        return int(r.get("result", {}).get("TTL", -1))

    def time_to_live(self, lease_id):
        r = self._post("/kv/lease/timetolive", {"ID": int(lease_id)})
        return int(r.get("TTL", -1))

    def revoke(self, lease_id):
        try:
            self._post("/kv/lease/revoke", {"ID": int(lease_id)})
        except EtcdError:
            pass        # already gone

    # ---- keys ---------------------------------------------------------------------

    def get(self, key):
        """KeyValue or None."""
        r = self._post("/kv/range", {"key": _b64(key)})
        kvs = r.get("kvs") or []
        return KeyValue(kvs[0]) if kvs else None

    def get_prefix(self, prefix):
        end = bytearray(prefix.encode())
        end[-1] += 1
        r = self._post("/kv/range", {"key": _b64(prefix), "range_end": _b64(bytes(end))})
        return [KeyValue(kv) for kv in r.get("kvs") or []]

    def put(self, key, value, lease_id=0):
        """Unconditional put; returns the store revision it made."""
        req = put(key, value, lease_id)["request_put"]
        r = self._post("/kv/put", req)
        return int(r["header"]["revision"])

    def delete(self, key):
        self._post("/kv/deleterange", {"key": _b64(key)})

    def txn(self, compare, success, failure=()):
        """One transaction: (succeeded, store revision, responses)."""
        r = self._post("/kv/txn", {"compare": list(compare), "success": list(success),
                                   "failure": list(failure)})
        return bool(r.get("succeeded", False)), int(r["header"]["revision"]), r.get("responses", [])

    @staticmethod
    def range_result(response):
        """The KeyValue of a request_range answer in a txn (or None)."""
        kvs = response.get("response_range", {}).get("kvs") or []
        return KeyValue(kvs[0]) if kvs else None
