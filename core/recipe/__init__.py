"""Recipes and method configs: the config base classes and their typed capabilities
(``config``), allocation configs (``allocation``), recipe files and stages (``recipes``) and the
typed plan a recipe resolves into, once (``plan``)."""
