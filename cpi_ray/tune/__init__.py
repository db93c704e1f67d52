"""Ray Tune search over the CPI-FT knobs (regions.p, groups.tau, fuse.omega, consolidation lr
and steps, ...), with probes computed once and every other stage shared between the trials
whose knobs it depends on."""
