"""Ranger, RangerLARS and Adan for fastai: exact, fast optimizers plus the ImageNette/ImageWoof leaderboard recipes

Modules:

- `fastai_ranger.core`: Shared machinery for every optimizer in the package: hyperparameter checks that name the culprit, a non-finite gradient policy, grouping tensors for multi-tensor kernels, and the bridge that makes a `torch.optim.Optimizer` a first-class fastai `opt_func`."""

__version__ = "0.1.0"
