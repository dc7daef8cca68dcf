"""``tmerge tune``: the fastest merged model within a drift budget (or the most faithful one within a
latency budget), measured on the target runtime. The search is described in :mod:`tmerge.tune.search`."""

from .budget import TuneConfig, parse_duration
from .evaluate import Entry
from .pareto import pareto_front
from .plot import plot_tune
from .search import split_images, tune
from .space import Candidate, adapter_candidate, search_space

__all__ = ["Candidate", "Entry", "TuneConfig", "adapter_candidate", "pareto_front", "parse_duration", "plot_tune",
           "search_space", "split_images", "tune"]
