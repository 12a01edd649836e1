"""Algorithm math, the Sample type, data sources and the Protocols the other packages meet through."""

from rl_core.sample import Sample, SampleStatus

__all__ = ["Sample", "SampleStatus"]
__version__ = "0.1.0"
