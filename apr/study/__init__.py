"""Studies: one YAML file names the trainings, the evaluations of each checkpoint and the report of a
paper table; ``apr-study run STUDY.yaml`` runs what is not done yet (locally, or on slurm through
slurm/*.sh). See docs/studies.md."""

from apr.study.plan import Step, plan, step_state
from apr.study.spec import Study, StudyError, load_study

__all__ = ["Study", "StudyError", "Step", "load_study", "plan", "step_state"]
