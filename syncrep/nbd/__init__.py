"""NBD (Network Block Device) export of replicated volumes.

``syncrep primary|secondary ... --nbd-listen HOST:PORT`` serves every volume
the node holds as an NBD export named after the volume (read-write on its
primary, read-only on its secondary; ``VOLUME@SNAPSHOT`` read-only on either),
so qemu-img, nbdcopy, fio (``--ioengine=nbd``) and nbd-client can use it.

* :mod:`syncrep.nbd.protocol` — constants and message (un)packing, no I/O.
* :mod:`syncrep.nbd.server` — the asyncio server and its backends.
* :mod:`syncrep.nbd.tls` — NBD_OPT_STARTTLS contexts from the certs directory
  (TLS required, client certificates: the CN is the user a grant names).
"""

from syncrep.nbd.server import (
    NBD_MAX_INFLIGHT,
    Backend,
    LocalBackend,
    NbdServer,
    NodeExports,
    PrimaryBackend,
    StaticExports,
    is_plaintext_safe,
    nbd_listen_type,
    parse_listen,
)
from syncrep.nbd.tls import client_ssl_context, server_ssl_context, write_nbd_client_dir

__all__ = [
    "NBD_MAX_INFLIGHT",
    "Backend",
    "LocalBackend",
    "NbdServer",
    "NodeExports",
    "PrimaryBackend",
    "StaticExports",
    "client_ssl_context",
    "is_plaintext_safe",
    "nbd_listen_type",
    "parse_listen",
    "server_ssl_context",
    "write_nbd_client_dir",
]
