"""The region's telemetry: an OTLP receiver and the store that folds the nodes' metrics into windows.

Domain cores (no ``grpc``): :mod:`.points` (what was received and admitted),
:mod:`.admission` (what is accepted, and the statuses), :mod:`.folding`
(cumulative and delta points into increments), :mod:`.quantiles` (quantiles of
merged explicit-bucket histograms), :mod:`.store` (SQLite windows, figures for
rollouts, per-node summaries, anomalies), :mod:`.hard_examples` (what a hard-example record
must be, and its export line), :mod:`.hard_example_table` (their bounded table),
:mod:`.write_queue` (the bounded queue
and its writer) and :mod:`.ingest` (a request's way from conversion to the
queue). Adapters: :mod:`.otlp_servicer` (OTLP ``MetricsService`` and
``LogsService``), :mod:`.forwarder_service` (a copy to an external collector) and
:mod:`.receiver_service` (the region's component).
"""
