"""Every MLflow tag kdray writes or reads, by name: the one place a tag is spelt (tests/test_tag_names.py checks
that no other module spells one). Tags are how kdray finds its runs again after a crash, a resume or a
concurrent run, so a renamed tag is a changed store format: old runs would no longer be found.
"""

# What a run is
ROLE = "kdray.role"  # teacher, assistant1, student, experiment, search, trial, bench, ...
VERSION = "kdray.version"  # the kdray that wrote the run
CONFIG_HASH = "kdray.config_hash"  # an experiment's resolved config: how a rerun finds its unfinished run
MODEL_KEY = "kdray.model_key"  # the store key of the model a stage's run trained or reused
MODEL_ID = "kdray.model_id"  # the logged MLflow model of that run
GIVEN_WEIGHTS = "kdray.given_weights"  # a given model's source (teacher.weights), evaluated, never trained

# How a stage's run ended or went on
REUSED = "kdray.reused"  # "true": the stage found its model in the store; "false": it trained it
SOURCE_RUN_ID = "kdray.source_run_id"  # a reused stage: the run that trained the model
RESUMED_FROM_EPOCH = "kdray.resumed_from_epoch"  # a stage continued from its checkpoint
ERROR = "kdray.error"  # why a run FAILED or was KILLED: the error, one line
STOPPED = "kdray.stopped"  # why Tune's scheduler stopped a trial (a FINISHED run, not a failure)
CLOSED = "kdray.closed"  # how a search driver closed a guide run it found open
STAGE_PREFIX = "kdray.stage."  # a trial's student stage's params where they differ from the trial's own

# Searches and their trials
SEARCH_NAME = "kdray.search_name"
OPTUNA_STORAGE = "kdray.optuna_storage"
OPTUNA_STUDY = "kdray.optuna_study"
SHARED_GUIDE = "kdray.shared_guide"  # "true": a guide trained before the trials, for all of them
TRIAL_ID = "kdray.trial_id"  # a trial run's Tune trial id: how a retried or restored trial finds its run
FIRST_TRIAL_ID = "kdray.first_trial_id"  # the Tune trial that opened a run another trial took over
UNRECORDED = "kdray.unrecorded"  # a trial run whose result Tune never recorded
SAMPLED = "kdray.sampled"  # the values Optuna sampled for the trial (JSON)
PROCESS = "kdray.process"  # host:pid that ran the trial: where its logs are, and which trials shared a process
MODELS_TRAINED = "kdray.models_trained"  # guides a trial trained
MODELS_REUSED = "kdray.models_reused"  # guides a trial found in the store
BEST_TRIAL = "kdray.best_trial"
BEST_RUN_ID = "kdray.best_run_id"
BEST_CONFIG = "kdray.best_config"
WINNER = "kdray.winner"  # "true" on the best trial's run
REGISTERED_MODEL = "kdray.registered_model"  # the Model Registry version of the best student
COST_SOURCE = "kdray.cost_source"  # "measured": this trial measured its student's cost; "reused": read it back
COST_TARGET = "kdray.cost_target"  # the CPU (and threads) the latency was measured on
PARETO = "kdray.pareto"  # "true" on a trial on the search's Pareto front, "false" on a dominated or infeasible one
PARETO_MODEL = "kdray.pareto_model"  # the Model Registry name whose versions are the front's students

# MLflow's own
PARENT_RUN_ID = "mlflow.parentRunId"
NOTE = "mlflow.note.content"
GIT_COMMIT = "mlflow.source.git.commit"  # the checkout kdray ran from, where it is a git checkout
EXPERIMENT_KIND = "mlflow.experimentKind"  # an experiment's kind: MLflow 3's UI opens others in its GenAI view
