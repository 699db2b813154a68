"""course_utils: the tested helper package of the structured-pruning course.

Start every notebook with ``profile = course_utils.setup()``; then load models with
``course_utils.models.load_model("llama")`` and measure them with ``course_utils.evaluation``.
"""

import logging


class _KnownHarmless(logging.Filter):
    """Drops two import-time notices that transformers triggers on every model load once torchao is installed:
    torchao's CUDA-only kernels that a CPU build of torch cannot load, and a torch deprecation notice about how
    torchao registers its enums. Neither affects anything the course runs; every other message passes."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        cuda_only_kernel = record.name == "torchao" and message.startswith("Failed to load") and "/_C" in message
        enum_notice = record.name == "torch.utils._pytree" and "is an Enum subclass" in message
        return not (cuda_only_kernel or enum_notice)


for _name in ("torchao", "torch.utils._pytree"):
    logging.getLogger(_name).addFilter(_KnownHarmless())

from .profiles import Profile, setup  # noqa: E402

__all__ = ["Profile", "setup"]
__version__ = "0.1.0"
