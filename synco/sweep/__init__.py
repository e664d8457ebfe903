"""`synco sweep`: many pretraining runs from one spec (a grid or zipped lists of config values x seeds),
launched locally or through submitit, then aggregated with confidence intervals and plotted.

* :mod:`.runner`      :func:`run_sweep`, the whole sweep step by step: start reading here
* :mod:`.spec`        spec reading, validation and expansion into points
* :mod:`.axes`        the ``axes:`` section parsed into dimensions
* :mod:`.planning`    the runs: each point's config (built as ``synco pretrain`` builds it), status and command
* :mod:`.launch`      local subprocess pool and submitit (SLURM) launchers
* :mod:`.probe_cache` ``--linear``: a linear probe per finished run, cached in the run's folder
* :mod:`.outputs`     reading each run's numbers, aggregation and the output files
* :mod:`.stats`       mean / std / Student-t CI, paired differences (pure maths)
* :mod:`.plots`       matplotlib figures
"""

from .spec import SweepSpec, expand_points, load_spec, parse_spec, spec_names
from .stats import describe, paired_difference

__all__ = ["SweepSpec", "describe", "expand_points", "load_spec", "paired_difference", "parse_spec", "run_sweep",
           "spec_names"]


def run_sweep(*args, **kwargs):
    """See :func:`synco.sweep.runner.run_sweep`."""
    from .runner import run_sweep as run

    return run(*args, **kwargs)
