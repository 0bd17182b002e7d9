"""Offline corpora for recipes and evaluations."""

from .shakespeare import ShakespeareSplit, load_plays, shakespeare_split

__all__ = ["ShakespeareSplit", "load_plays", "shakespeare_split"]
