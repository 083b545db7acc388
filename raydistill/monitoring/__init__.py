"""Watching runs and sweeps while they run.

- ``metrics``: Prometheus series (``ray.util.metrics``) from every training worker and the sweep driver,
  exported by Ray's metrics agent on each node (``ray_raydistill_*``), and the FLOP estimate behind MFU.
- ``board``: a small Ray actor the workers and trial drivers post their phase and progress to (fire and
  forget), read by the terminal display; it also exports the phase series.
- ``terminal``: the driver's progress display: a live rich display in a terminal, plain lines otherwise.
- ``grafana``: the Grafana dashboard shipped with the package (``dashboards/raydistill.json``) and where to
  install it so Ray's Grafana provisioning picks it up (``raydistill dashboard``)."""
