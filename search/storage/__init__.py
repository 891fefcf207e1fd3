"""Where a sweep lives, local or remote, and its Optuna study storage.

`SweepLocation` is the one model of a sweep's place: its experiment directory, this machine's
copy of its files, its state (sweep.json, the study) and the copy routine between them.
"""
from search._lazy import attach

__all__, __getattr__, __dir__ = attach(__name__, {
    "_keeper": ["CheckpointKeeper"],
    "_location": ["TUNE_SNAPSHOT", "SweepLocation", "is_remote", "join_uri", "resolve_storage", "study_spec_from_flag"],
    "_study": ["PACED", "SnapshotPacedJournal", "StateSync", "flush_studies", "open_study_storage", "publish",
               "snapshot_target"],
})
