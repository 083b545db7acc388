"""Ray Tune sweeps over experiment configs: sweep files, the trial driver, results and leaderboards."""
