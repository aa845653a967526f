"""The training loop's parts, one job each; `wattkd.train` strings them together."""
