"""amata-runner's Hydra launchers: ``hydra/launcher=slurm``, ``local_submitit``, ``local_parallel``.

Hydra instantiates launchers only from classes defined in the ``hydra_plugins`` namespace, so
they are declared here; what they add to the plugins' launchers lives in
:mod:`amata_runner.launchers`. Without the ``cluster`` extra nothing is declared (and Hydra's
plugin scan, which imports this module at every start, stays quiet).
"""

from amata_runner.launchers import GpuPerWorker, SubmititJobs

try:
    from hydra_plugins.hydra_submitit_launcher import submitit_launcher
except ImportError:
    pass
else:

    class SlurmLauncher(SubmititJobs, submitit_launcher.SlurmLauncher):
        """submitit's SLURM launcher; a time limit or preemption checkpoints, then requeues."""

    class LocalLauncher(SubmititJobs, submitit_launcher.LocalLauncher):
        """The same job handling on this machine, through submitit's local executor."""


try:
    from hydra_plugins.hydra_joblib_launcher import joblib_launcher
except ImportError:
    pass
else:

    class JoblibLauncher(GpuPerWorker, joblib_launcher.JoblibLauncher):
        """joblib's launcher with each worker process pinned to one GPU."""
