"""Operations on TDs through libvirt: define (assemble), start with its preflight, stop,
destroy, undefine, list, show (tds), repair, and the fleet's parallel queries."""
