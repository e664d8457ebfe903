"""`synco sweep`: many pretraining runs from one spec (a grid or zipped lists of config values x seeds),
launched locally or through submitit, then aggregated with confidence intervals and plotted.

* :mod:`.spec`   spec parsing, validation and expansion into points
* :mod:`.stats`  mean / std / Student-t CI, paired differences (pure maths)
* :mod:`.launch` local subprocess pool and submitit (SLURM) launchers
* :mod:`.runner` planning, resuming, evaluation, aggregation and output files
* :mod:`.plots`  matplotlib figures
"""

from .spec import SweepSpec, expand_points, load_spec, parse_spec, spec_names
from .stats import describe, paired_difference

__all__ = ["SweepSpec", "describe", "expand_points", "load_spec", "paired_difference", "parse_spec", "run_sweep",
           "spec_names"]


def run_sweep(*args, **kwargs):
    """See :func:`synco.sweep.runner.run_sweep`."""
    from .runner import run_sweep as run

    return run(*args, **kwargs)
