"""tuneplan's analytic planner: memory, throughput and the search over configurations.

Pure arithmetic over frozen dataclasses: importing it must not import torch or transformers.
"""
