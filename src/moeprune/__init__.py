"""moeprune: prune routed experts from Mixture-of-Experts language models.

The pipeline is four stages, each a module and a CLI verb:
profile (``moeprune.profiling``) -> plan (``moeprune.planning``) -> apply (``moeprune.surgery``)
-> evaluate (``moeprune.evaluation``).
"""

__version__ = "0.2.0.dev0"
