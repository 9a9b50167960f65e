"""Shared factories and checks of the test suite (importable as ``helpers``: pyproject's pytest ``pythonpath``).

- :mod:`helpers.problems`: stacked LoRA aggregation problems, tolerances that follow the
  conditioning of each Procrustes problem, the device list, aliasing and dense-definition checks,
  synthetic peft-style state dicts (no peft needed).
- :mod:`helpers.peft_models`: tiny real peft models (random weights, no hub) and rounds built on them.

Every random draw here takes an explicit seed; assertion messages name it (``seed=...``).
"""
