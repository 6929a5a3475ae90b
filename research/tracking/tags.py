"""Every MLflow run tag the platform writes or reads, by name: the contract between the trainer,
the grid, the sweep, the comparison and ``lab status``."""

ABLATION = "ablation"  # the question a run answers (its grid, or ``ablation=``)
ARM = "arm"  # the grid arm's label, e.g. "attention=mla ffn=moe"
BASELINE = "baseline"  # the arm the grid's deltas are measured against
CONFIG_HASH = "config_hash"  # what the run computes: equal hashes, equal runs
GRID_BASE = "grid.base"  # the launch's config without its arms: runs of one launch share it
RUN_DIR = "run_dir"  # the run's folder: its log, config.yaml and checkpoints
GIT_REVISION = "git_revision"
FAILURE_REASON = "failure_reason"  # one line: why a FAILED run failed
KILLED_REASON = "killed_reason"  # why a run was closed as KILLED (died before it could resume)
RESUMES = "resumes"  # how many times the run was resumed into
REQUEUED_AT_STEP = "requeued_at_step"  # the step of its last Slurm requeue
JOB_ID = "slurm.job_id"  # the scheduler's job (an array task: ARRAY_TASK)
DECODE_ERROR = "eval.decode_error"  # why eval.decode measured nothing (the run itself finished)
MOE_COLLAPSED = "moe.collapsed"  # "true": some MoE layer's routing collapsed (MoEMonitor)
KIND = "lab.kind"  # "sweep" (a sweep's parent run) or "report" (a comparison's report run)
REPORT_OF = "lab.report_of"  # a hash of the compared runs' ids: one report run per comparison
STUDY = "optuna.study"
TRIAL = "optuna.trial"
TRIAL_STATE = "optuna.state"  # COMPLETE, PRUNED or FAIL
PARENT_RUN = "mlflow.parentRunId"  # MLflow's own: a trial's sweep run
