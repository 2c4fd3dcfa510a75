"""``virtwire explain``: turn a trace into a narrative and a self-contained HTML page."""

from virtwire.explain.model import PHASES, Analysis, analyze, load
from virtwire.explain.narrative import narrate

__all__ = ["PHASES", "Analysis", "analyze", "load", "narrate"]
