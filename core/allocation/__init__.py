"""Allocation searches: the typed problem and result (``problem``), level sets and
level databases (``level_sets``, ``levels``, ``level_build``), structured width levels
(``width_levels``), the fitness (``fitness``) and the allocation stage itself (``allocate``)."""
