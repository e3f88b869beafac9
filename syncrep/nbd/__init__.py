"""NBD (Network Block Device) export of replicated volumes.

``syncrep primary|secondary ... --nbd-listen HOST:PORT`` serves every volume
the node holds as an NBD export named after the volume (read-write on its
primary, read-only on its secondary; ``VOLUME@SNAPSHOT`` read-only on either),
so qemu-img, nbdcopy, fio (``--ioengine=nbd``) and nbd-client can use it.

* :mod:`syncrep.nbd.protocol` — constants and message (un)packing, no I/O.
* :mod:`syncrep.nbd.server` — the asyncio server and its backends.
"""

from syncrep.nbd.server import (
    NBD_MAX_INFLIGHT,
    Backend,
    LocalBackend,
    NbdServer,
    NodeExports,
    PrimaryBackend,
    StaticExports,
    nbd_listen_type,
    parse_listen,
)

__all__ = [
    "NBD_MAX_INFLIGHT",
    "Backend",
    "LocalBackend",
    "NbdServer",
    "NodeExports",
    "PrimaryBackend",
    "StaticExports",
    "nbd_listen_type",
    "parse_listen",
]
