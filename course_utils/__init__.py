"""course_utils: the tested helper package of the structured-pruning course.

Start every notebook with ``profile = course_utils.setup()``; then load models with
``course_utils.models.load_model("llama")`` and measure them with ``course_utils.evaluation``.
"""

from .profiles import Profile, setup

__all__ = ["Profile", "setup"]
__version__ = "0.1.0"
