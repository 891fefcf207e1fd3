"""Tools for a finished sweep: the strong evaluation of its front (`python -m search.evaluate`)
and the export of one trial's model (`python -m search.export`)."""
from search._lazy import attach

__all__, __getattr__, __dir__ = attach(__name__, {
    "_evaluate": ["evaluate_main"],
    "_export": ["export_main"],
})
