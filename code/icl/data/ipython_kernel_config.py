# Installed by `make setup` into .venv/etc/ipython/, where every IPython kernel of the venv reads it.
#
# ipykernel 7 logs a WARNING at every kernel start when the kernel talks over TCP without CurveZMQ
# encryption. Quarto's Jupyter engine starts its kernels that way (on 127.0.0.1, with HMAC-signed
# messages), so every chapter of a render would print it, and the book's render check fails on any
# WARNING line. This filter drops that one message and nothing else.
import logging


class _DropLocalTcpNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "Kernel is running over TCP without encryption" not in record.getMessage()


logging.getLogger("IPKernelApp").addFilter(_DropLocalTcpNotice())
