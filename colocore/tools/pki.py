"""A throw-away PKI for TLS tests and benchmarks, made with the openssl command (EC
P-256: fast to make and to use).

make_pki(root) returns a dict of directories laid out as QEMU's tls-creds-x509 dir=
expects (ca-cert.pem, server-cert.pem, server-key.pem, client-cert.pem, client-key.pem):

    server       CN=secondary (SAN 127.0.0.1, localhost), signed by the CA
    client       CN=primary, signed by the CA
    intruder     CN=intruder, signed by the same CA (valid, but not pinned by authz)
    wrong_ca     CN=primary, signed by another CA
    expired      CN=primary, signed by the CA, expired yesterday
    client_trusting_wrong_ca  a client whose ca-cert.pem is the other CA (refuses the server)
"""
import os
import shutil
import subprocess


def _ssl(*args, cwd):
    p = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True)
    if p.returncode:
        raise RuntimeError("openssl %s: %s" % (" ".join(args), p.stderr))


def _ca(work, name):
    _ssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
         "-keyout", name + ".key", "-out", name + ".pem", "-subj", "/CN=%s" % name,
         "-days", "30", cwd=work)
    return os.path.join(work, name + ".pem"), os.path.join(work, name + ".key")


def _leaf(work, name, subject, ca, days=30, san=None):
    _ssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
         "-keyout", name + ".key", "-out", name + ".csr", "-subj", subject, cwd=work)
    args = ["x509", "-req", "-in", name + ".csr", "-CA", ca[0], "-CAkey", ca[1],
            "-CAcreateserial", "-out", name + ".pem", "-days", str(days)]
    if san:
        ext = os.path.join(work, name + ".ext")
        with open(ext, "w") as f:
            f.write("subjectAltName=%s\n" % san)
        args += ["-extfile", ext]
    _ssl(*args, cwd=work)
    return os.path.join(work, name + ".pem"), os.path.join(work, name + ".key")


def _creds_dir(root, name, ca_pem, role, leaf):
    d = os.path.join(root, name)
    os.makedirs(d, exist_ok=True)
    shutil.copy(ca_pem, os.path.join(d, "ca-cert.pem"))
    shutil.copy(leaf[0], os.path.join(d, "%s-cert.pem" % role))
    shutil.copy(leaf[1], os.path.join(d, "%s-key.pem" % role))
    return d


def make_pki(root):
    work = os.path.join(root, "pki")
    os.makedirs(work, exist_ok=True)
    ca = _ca(work, "ca")
    other = _ca(work, "otherca")
    server = _leaf(work, "server", "/O=colocore/CN=secondary", ca,
                   san="IP:127.0.0.1,DNS:localhost")
    client = _leaf(work, "client", "/O=colocore/CN=primary", ca)
    return {
        "server": _creds_dir(root, "server", ca[0], "server", server),
        "client": _creds_dir(root, "client", ca[0], "client", client),
        "intruder": _creds_dir(root, "intruder", ca[0], "client",
                               _leaf(work, "intruder", "/O=colocore/CN=intruder", ca)),
        "wrong_ca": _creds_dir(root, "wrong_ca", ca[0], "client",
                               _leaf(work, "wrongca", "/O=colocore/CN=primary", other)),
        "expired": _creds_dir(root, "expired", ca[0], "client",
                              _leaf(work, "expired", "/O=colocore/CN=primary", ca, days=-1)),
        "client_trusting_wrong_ca": _creds_dir(root, "client_trusting_wrong_ca", other[0],
                                               "client", client),
        "ca_pem": ca[0],
    }


def fingerprint(cert_pem):
    p = subprocess.run(["openssl", "x509", "-in", cert_pem, "-noout", "-fingerprint", "-sha256"],
                       capture_output=True, text=True, check=True)
    return "sha256:" + p.stdout.strip().split("=", 1)[1]
