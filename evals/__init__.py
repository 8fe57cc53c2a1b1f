"""Floor 4: the ToyWorld judge and `run.py eval image|video|3d`, which run a job and score its output
against ToyWorld's ground truth. It may import every floor below it."""
