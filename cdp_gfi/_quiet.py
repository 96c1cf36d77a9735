"""Third-party noise filtered where it arises, by message and module, so that only warnings worth reading show.

Imported first by ``cdp_gfi/__init__.py``: every script, bench and user of the
package gets the same filters. Our own warnings, and any other of NNI's or
torch's, still show.
"""
import logging
import re
import warnings

# (message regex, category, module regex) of each warning filtered
THIRD_PARTY_NOISE = (
    # NNI 3.0 registers fx's immutable containers with torch's deprecated private API when its speedup loads ...
    (r"`torch\.utils\._pytree\._register_pytree_node` is deprecated", FutureWarning, r"nni\."),
    # ... and torch, which registered them already, says so.
    (r".*immutable_collections\.immutable_(dict|list)'> is already registered as pytree node", UserWarning,
     r"torch\.utils\._pytree"),
    # nni.get_next_parameter() outside an experiment: our trials run standalone on purpose.
    (r".*Running trial code without runtime", RuntimeWarning, r"nni\.runtime\."),
)


# (logger, message regex) of each log record dropped: torch.utils.benchmark (latency timing) loads cpp_extension,
# which logs this on every machine without CUDA
LOGGED_NOISE = (("torch.utils.cpp_extension", r"No CUDA runtime is found"),)


class _Drop(logging.Filter):
    """Drops the records whose message matches ``pattern``."""

    def __init__(self, pattern: str):
        super().__init__()
        self.pattern = re.compile(pattern)

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.pattern.match(record.getMessage())


def install() -> None:
    """Add the filters (idempotent: ``warnings`` drops a duplicate filter, a logger one of the same pattern)."""
    for message, category, module in THIRD_PARTY_NOISE:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)
    for name, pattern in LOGGED_NOISE:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _Drop) and f.pattern.pattern == pattern for f in logger.filters):
            logger.addFilter(_Drop(pattern))


install()
