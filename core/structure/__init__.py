"""Block-level changes: the typed changes and applying them (``blocks``), structured
pruning of heads and neurons (``structured``), hidden-width pruning (``hidden``) and dropping
blocks or sub-blocks (``dropping``)."""
