"""The layer that ties the stages together for fleets: Ray aggregation and solves (``fleet``)."""
