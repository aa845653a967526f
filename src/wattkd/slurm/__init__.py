"""Run the experiment on a Slurm cluster: one sbatch script per stage, chained with
dependencies, repeats as job arrays, preemption handled by checkpoint + requeue.

`submit_pipeline` writes and submits the scripts (docs/slurm.md explains the flow);
`print_status` shows what ran. Both are what `wattkd slurm submit|status` call.
"""

from wattkd.slurm.graph import STAGES, SlurmError, StageJob, build_graph, format_graph
from wattkd.slurm.status import collect_status, print_status
from wattkd.slurm.submit import plan, submit_pipeline

__all__ = ["STAGES", "SlurmError", "StageJob", "build_graph", "collect_status", "format_graph",
           "plan", "print_status", "submit_pipeline"]
