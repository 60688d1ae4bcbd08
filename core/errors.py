"""Exceptions with messages that name the problem and the fix."""


class LlmpressError(Exception):
    """Base class of llmpress errors."""


class RecipeError(LlmpressError, ValueError):
    """A recipe (or method config) is invalid: unknown method, bad option, bad pattern."""


class ModelError(LlmpressError, ValueError):
    """A model cannot be compressed as asked (no repeated blocks, shapes that do not fit)."""


class CalibrationError(LlmpressError, ValueError):
    """Calibration data cannot be built (missing file, text too short)."""


class CheckpointError(LlmpressError, ValueError):
    """A saved checkpoint is corrupt, incomplete or from a newer llmpress."""


class EvalTaskError(LlmpressError, ValueError):
    """An lm-eval-harness task cannot be found, loaded or run."""


class AllocationError(LlmpressError, ValueError):
    """An allocation search cannot run as asked (a budget no level set meets, a level database
    built for another model, recipe or calibration set, an empty level list)."""
