"""Training: the train loop and what it needs (the top layer of the package).

`train` (the loop of `run.py`), `steps` (the jitted train / eval steps), `optim`
(AdamW with warmup + cosine), `checkpoint` (orbax), `metrics` (JSON lines,
TensorBoard, progress bar, step timer), `plot` (the loss plot) and `sample`
(text from a checkpoint). Imports point down: these modules import the model,
the data and each other, never the other way.
"""
