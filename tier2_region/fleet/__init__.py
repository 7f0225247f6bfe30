"""The region's fleet: enrollment, signed check-ins, deployments and the variant each node gets.

* :mod:`~tier2_region.fleet.domain` — what a node says about itself, and what it gets back;
* :mod:`~tier2_region.fleet.inventory` — the SQLite inventory (nodes, tokens, deployments, nonces);
* :mod:`~tier2_region.fleet.assignment` — which variant of a model fits a node (a pure rule);
* :mod:`~tier2_region.fleet.catalog` — the registry's variants as the rule reads them;
* :mod:`~tier2_region.fleet.fleet` — :class:`~tier2_region.fleet.fleet.Fleet`, the core the
  fleet service and the CLI call.
* :mod:`~tier2_region.fleet.rollout` — a staged rollout: its plan, states and cohorts;
  :mod:`~tier2_region.fleet.rollout_gate` its gates, :mod:`~tier2_region.fleet.rollout_policy`
  the pure step from one state to the next, :mod:`~tier2_region.fleet.rollout_store` its tables,
  :mod:`~tier2_region.fleet.rollout_controller` the controller the region's ticker and the CLI call;
* :mod:`~tier2_region.fleet.figures` — what telemetry tells rollouts (the contract with the store).
"""
