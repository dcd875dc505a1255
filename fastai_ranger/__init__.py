"""Ranger, RangerLARS and Adan for fastai: exact, fast optimizers plus the ImageNette/ImageWoof leaderboard recipes

Modules:

- `fastai_ranger.registry`: One table of every optimizer the package trains with: its `opt_func`, its torch class, the fastai-style hyperparameters it takes, its recipe defaults and its timm names. The CLI, config checks, the study, timm registration, the tests and the benchmarks all read it.
- `fastai_ranger.results`: What every result of the package carries (library versions, hardware), and the tables and plots the CLI and the optimizer study write: one module, so a training run and a study row are recorded the same way."""

__version__ = "0.1.0"
