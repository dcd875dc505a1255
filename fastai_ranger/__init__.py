"""Ranger, RangerLARS and Adan for fastai: exact, fast optimizers plus the ImageNette/ImageWoof leaderboard recipes"""

__version__ = "0.1.0"
