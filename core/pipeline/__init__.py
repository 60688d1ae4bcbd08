"""The pipeline: ``compress`` resolves a recipe once into a typed plan and one runner
executes its stages (``compress``, ``runner``)."""
