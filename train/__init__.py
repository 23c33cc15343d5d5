"""Training side of the project: data loading (data.py), lesion-grouped splits (splits.py), transforms
(transforms.py), class balance (balance.py), training (train.py), evaluation (evaluate.py).

Nothing in model/ imports from here; importing this package stays cheap (no submodule imports).
"""
