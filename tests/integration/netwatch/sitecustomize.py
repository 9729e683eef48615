"""Records every attempt of this process to reach another host: put this folder first on PYTHONPATH
(every Python process of a launch imports ``sitecustomize`` at start, torchrun's workers included) and
name a file in ``NETWATCH_FILE``; each name lookup (``socket.getaddrinfo``) or ``connect`` to an
address that is not this machine appends one JSON line with the pid, the host and the stack.

Test-only (tests/integration/test_rehearsal_log.py): it proves "no network at all" from outside the
code it watches; setting HF_HUB_OFFLINE proves nothing about what a library does anyway.
"""

import ipaddress
import json
import os
import socket
import traceback

_OUT = os.environ.get("NETWATCH_FILE")
_HERE = {"localhost", "", None, socket.gethostname()}


def _local(host) -> bool:
    if isinstance(host, bytes):
        host = host.decode()
    if host in _HERE:
        return True
    try:
        address = ipaddress.ip_address(str(host).split("%")[0])
    except ValueError:
        return False
    return address.is_loopback or address.is_unspecified


def _record(kind: str, host) -> None:
    with open(_OUT, "a") as f:
        stack = traceback.format_stack()[:-2]
        f.write(json.dumps({"pid": os.getpid(), "kind": kind, "host": str(host), "stack": stack[-25:]}) + "\n")


if _OUT:
    _connect, _connect_ex, _getaddrinfo = socket.socket.connect, socket.socket.connect_ex, socket.getaddrinfo

    def connect(self, address):
        if self.family in (socket.AF_INET, socket.AF_INET6) and not _local(address[0]):
            _record("connect", address)
        return _connect(self, address)

    def connect_ex(self, address):
        if self.family in (socket.AF_INET, socket.AF_INET6) and not _local(address[0]):
            _record("connect", address)
        return _connect_ex(self, address)

    def getaddrinfo(host, *args, **kwargs):
        if not _local(host):
            _record("resolve", host)
        return _getaddrinfo(host, *args, **kwargs)

    socket.socket.connect, socket.socket.connect_ex, socket.getaddrinfo = connect, connect_ex, getaddrinfo
