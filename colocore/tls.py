"""TLS the way QEMU does it, with Python's ssl: credentials objects, authorization, and
the wrap of one connected socket on each side.

    --object tls-creds-x509,id=tls0,dir=DIR,endpoint=server|client[,verify-peer=on|off]
    --object authz-simple,id=auth0,identity=CN=primary.example
    --object authz-simple,id=auth1,identity=sha256:5F:0A:...   (one certificate pinned)

DIR holds QEMU's file names: ca-cert.pem, and server-cert.pem + server-key.pem (endpoint
server) or client-cert.pem + client-key.pem (endpoint client; optional unless the server
asks for them, which it does by default). verify-peer=on is the default on both sides:
the server requires a client certificate signed by ca-cert.pem (mutual authentication),
the client checks the server's certificate and its name (tls-hostname, or the host of the
URI). authz-simple pins WHO among the holders of a valid certificate may connect: its
`identity` is either a distinguished name, every attribute of which the peer's subject
must have (QEMU's ",," escapes a comma: identity=CN=primary,,O=example), or
sha256:FINGERPRINT of one certificate (`openssl x509 -noout -fingerprint -sha256`).

Every package may import this module (like errors.py): the migration channel
(migration/transport.py), the chardevs and the node use it.
"""
import dataclasses
import hashlib
import logging
import os
import ssl

from colocore.errors import ColocoreError

log = logging.getLogger("colocore.tls")

HANDSHAKE_TIMEOUT = 5.0
FILES = {"server": ("server-cert.pem", "server-key.pem"),
         "client": ("client-cert.pem", "client-key.pem")}
_SHORT = {"commonName": "CN", "organizationName": "O", "organizationalUnitName": "OU",
          "countryName": "C", "stateOrProvinceName": "ST", "localityName": "L",
          "emailAddress": "emailAddress", "domainComponent": "DC"}


class TlsRefused(ColocoreError):
    """A peer failed the handshake or the authorization: it gets nothing."""


@dataclasses.dataclass(frozen=True)
class Security:
    """What is known of a connection's peer (query-migrate's x-channel)."""
    tls: bool = False
    authenticated: bool = False      # the peer showed a certificate our CA signed
    peer: str = ""                   # its subject, RFC 4514 order (CN=... first)
    fingerprint: str = ""
    version: str = ""

    def as_dict(self):
        d = {"tls": self.tls, "authenticated": self.authenticated}
        if self.tls:
            d.update({"peer-identity": self.peer, "peer-fingerprint": self.fingerprint,
                      "tls-version": self.version})
        return d

    def describe(self):
        if not self.tls:
            return "plain tcp, not authenticated"
        if not self.authenticated:
            return "tls (%s), peer not authenticated" % self.version
        return "tls (%s), peer authenticated as %s" % (self.version, self.peer or "?")


PLAIN = Security()


# ---- objects ---------------------------------------------------------------------------

def split_options(text):
    """QEMU's option syntax: comma separated, ",," is a literal comma."""
    parts, cur, i = [], [], 0
    while i < len(text):
        c = text[i]
        if c == ",":
            if text[i + 1:i + 2] == ",":
                cur.append(",")
                i += 2
                continue
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(c)
        i += 1
    parts.append("".join(cur))
    return parts


def _onoff(obj, name, value):
    if value in ("on", "yes", "true"):
        return True
    if value in ("off", "no", "false"):
        return False
    raise ColocoreError("--object %s: %s=%s must be on or off" % (obj, name, value))


class TlsCreds:
    """tls-creds-x509: an ssl.SSLContext built (and every file read) at creation, so a
    missing or bad file is a start-up error, not a failed migration later."""

    def __init__(self, obj_id, directory, endpoint, verify_peer=True):
        self.id = obj_id
        self.dir = directory
        self.endpoint = endpoint
        self.verify_peer = verify_peer
        self.context = self._context()

    def _path(self, name):
        return os.path.join(self.dir, name)

    def _load(self, fn, *names):
        try:
            fn(*[self._path(n) for n in names])
        except (OSError, ValueError) as exc:   # ssl.SSLError is an OSError
            raise ColocoreError(
                "tls-creds-x509 %s: cannot load %s: %s; the directory needs %s" % (
                    self.id, " and ".join(self._path(n) for n in names),
                    getattr(exc, "strerror", None) or getattr(exc, "reason", None) or exc,
                    ", ".join(self._needed()))) from None

    def _needed(self):
        names = ["ca-cert.pem"] if self.verify_peer or self.endpoint == "client" else []
        return names + list(FILES[self.endpoint])

    def _context(self):
        if self.endpoint == "server":
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            self._load(ctx.load_cert_chain, *FILES["server"])
            if self.verify_peer:
                ctx.verify_mode = ssl.CERT_REQUIRED       # mutual authentication
                self._load(lambda ca: ctx.load_verify_locations(cafile=ca), "ca-cert.pem")
        else:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            if self.verify_peer:
                self._load(lambda ca: ctx.load_verify_locations(cafile=ca), "ca-cert.pem")
            else:
                ctx.check_hostname = False
                ctx.verify_mode = ssl.CERT_NONE
            cert, key = FILES["client"]
            if os.path.exists(self._path(cert)) or os.path.exists(self._path(key)):
                self._load(ctx.load_cert_chain, cert, key)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        return ctx

    def describe(self):
        return "tls-creds-x509 %s (endpoint %s, verify-peer %s, %s)" % (
            self.id, self.endpoint, "on" if self.verify_peer else "off", self.dir)


class Authz:
    """authz-simple: the one identity allowed (a DN's attributes, or sha256:FINGERPRINT)."""

    def __init__(self, obj_id, identity):
        self.id = obj_id
        self.identity = identity
        if identity.lower().startswith("sha256:"):
            digest = identity[7:].replace(":", "").lower()
            if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
                raise ColocoreError("--object authz-simple,id=%s: identity=sha256:... needs the "
                                    "64 hex digits of a SHA-256 fingerprint" % obj_id)
            self.fingerprint, self.attributes = digest, None
        else:
            self.fingerprint = None
            self.attributes = _parse_dn(identity, obj_id)

    def allows(self, security):
        if not security.authenticated:
            return False
        if self.fingerprint is not None:
            return security.fingerprint.replace(":", "").lower() == self.fingerprint
        have = set(_parse_dn(security.peer, "peer"))
        return all(a in have for a in self.attributes)


def _parse_dn(text, obj_id):
    pairs = []
    for part in _split_dn(text):
        key, sep, value = part.partition("=")
        if not sep or not key.strip():
            raise ColocoreError("--object authz-simple,id=%s: identity %r is not a distinguished "
                                "name like CN=primary,,O=example (or sha256:FINGERPRINT)"
                                % (obj_id, text))
        pairs.append((key.strip().upper() if key.strip().upper() in _SHORT.values()
                      else key.strip(), value.strip()))
    return pairs


def _split_dn(text):
    out, cur, esc = [], [], False
    for c in text:
        if esc:
            cur.append(c)
            esc = False
        elif c == "\\":
            esc = True
        elif c == ",":
            out.append("".join(cur))
            cur = []
        else:
            cur.append(c)
    out.append("".join(cur))
    return [p for p in out if p.strip()]


def _dn_escape(value):
    return value.replace("\\", "\\\\").replace(",", "\\,")


def parse_object(spec):
    """One --object: a TlsCreds or an Authz; ColocoreError with the fix otherwise."""
    kind, *opts = split_options(spec)
    options = {}
    for o in opts:
        k, sep, v = o.partition("=")
        if not sep:
            raise ColocoreError("--object %s: option %r needs a value (KEY=VALUE)" % (spec, o))
        options[k] = v
    obj_id = options.pop("id", "")
    if not obj_id:
        raise ColocoreError("--object %s: needs id=NAME" % spec)
    if kind == "tls-creds-x509":
        directory = options.pop("dir", "")
        endpoint = options.pop("endpoint", "client")
        verify = _onoff(spec, "verify-peer", options.pop("verify-peer", "on"))
        if not directory:
            raise ColocoreError("--object %s: needs dir=DIRECTORY (ca-cert.pem, server-cert.pem, "
                                "server-key.pem, client-cert.pem, client-key.pem)" % spec)
        if endpoint not in FILES:
            raise ColocoreError("--object %s: endpoint must be server or client" % spec)
        _no_more(spec, options, "id, dir, endpoint, verify-peer")
        return TlsCreds(obj_id, directory, endpoint, verify)
    if kind == "authz-simple":
        identity = options.pop("identity", "")
        if not identity:
            raise ColocoreError("--object %s: needs identity=DN or identity=sha256:FINGERPRINT" % spec)
        _no_more(spec, options, "id, identity")
        return Authz(obj_id, identity)
    raise ColocoreError("--object %s: unknown object type %r; colocore knows tls-creds-x509 "
                        "and authz-simple" % (spec, kind))


def _no_more(spec, options, known):
    if options:
        raise ColocoreError("--object %s: unknown option(s) %s; known: %s"
                            % (spec, ", ".join(sorted(options)), known))


class Objects:
    """The node's --object table (QEMU's /objects)."""

    def __init__(self, specs=()):
        self.table = {}
        for spec in specs:
            obj = parse_object(spec)
            if obj.id in self.table:
                raise ColocoreError("--object %s: id %r is used twice" % (spec, obj.id))
            self.table[obj.id] = obj

    def creds(self, obj_id, endpoint, what):
        obj = self.table.get(obj_id)
        if not isinstance(obj, TlsCreds):
            raise ColocoreError("%s: no TLS credentials with id '%s'; create them with "
                                "--object tls-creds-x509,id=%s,dir=DIR,endpoint=%s"
                                % (what, obj_id, obj_id, endpoint))
        if endpoint is not None and obj.endpoint != endpoint:
            raise ColocoreError("%s: TLS credentials '%s' have endpoint=%s; this side needs "
                                "endpoint=%s" % (what, obj_id, obj.endpoint, endpoint))
        return obj

    def authz(self, obj_id, what):
        obj = self.table.get(obj_id)
        if not isinstance(obj, Authz):
            raise ColocoreError("%s: no authorization object with id '%s'; create it with "
                                "--object authz-simple,id=%s,identity=CN=..." % (what, obj_id, obj_id))
        return obj


# ---- the handshake on one connected socket ----------------------------------------------

def security_of(ssl_sock):
    """Security of an established TLS connection (an SSLSocket or an SSLObject)."""
    der = ssl_sock.getpeercert(binary_form=True)
    cert = ssl_sock.getpeercert() if der else None
    peer, fp = "", ""
    if der:
        fp = ":".join("%02X" % b for b in hashlib.sha256(der).digest())
    if cert:
        rdns = [pair for rdn in cert.get("subject", ()) for pair in rdn]
        peer = ",".join("%s=%s" % (_SHORT.get(k, k), _dn_escape(v)) for k, v in reversed(rdns))
    return Security(tls=True, authenticated=bool(cert), peer=peer, fingerprint=fp,
                    version=ssl_sock.version() or "")


def refusal_reason(exc):
    if isinstance(exc, ssl.SSLCertVerificationError):
        return "certificate refused: %s" % (exc.verify_message or exc.reason)
    if isinstance(exc, ssl.SSLError):
        return "TLS handshake failed: %s" % (exc.reason or exc)
    if isinstance(exc, TimeoutError):
        return "no TLS handshake within %.0f s" % HANDSHAKE_TIMEOUT
    return "TLS handshake failed: %s" % (getattr(exc, "strerror", None) or exc)


def server_wrap(sock, creds, authz, peer, what):
    """Server side of one accepted socket: (SSLSocket, Security), or TlsRefused (the socket
    is closed and the refusal logged, naming the peer) for a peer that must get nothing."""
    try:
        sock.settimeout(HANDSHAKE_TIMEOUT)
        tls_sock = creds.context.wrap_socket(sock, server_side=True)
    except (OSError, ValueError) as exc:
        sock.close()
        reason = refusal_reason(exc)
        log.warning("%s: refused %s: %s", what, peer, reason)
        raise TlsRefused("%s: %s" % (peer, reason)) from None
    sec = security_of(tls_sock)
    if authz is not None and not authz.allows(sec):
        tls_sock.close()
        log.warning("%s: refused %s: certificate %s (sha256 %s) is not allowed by authz %s",
                    what, peer, sec.peer or "?", sec.fingerprint, authz.id)
        raise TlsRefused("%s: not authorized" % peer)
    tls_sock.settimeout(None)
    log.info("%s: %s connected with TLS as %s", what, peer, sec.peer or "an unverified client")
    return tls_sock, sec


def client_wrap(sock, creds, hostname, what):
    """Client side: (SSLSocket, Security); ColocoreError saying why the server or its
    name was not accepted (nothing was sent to it)."""
    try:
        sock.settimeout(HANDSHAKE_TIMEOUT)
        tls_sock = creds.context.wrap_socket(
            sock, server_hostname=hostname if creds.context.check_hostname else None)
    except (OSError, ValueError) as exc:
        sock.close()
        raise ColocoreError("%s: %s with %s; check tls-creds, tls-hostname and the peer's "
                            "certificate" % (what, refusal_reason(exc), hostname)) from None
    tls_sock.settimeout(None)
    return tls_sock, security_of(tls_sock)
