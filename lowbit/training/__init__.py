"""Training of the models lowbit ships (the reference text-to-image model, the digit classifier):
``python -m lowbit.training.train reference|classifier``."""
