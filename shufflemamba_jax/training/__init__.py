"""Training: the settings of a run, the jitted train and evaluation steps, the optimizer, mixup,
metrics, preemption, and the loop (`trainer.train_and_evaluate`). Imports the model, parallel,
data and weights layers."""
