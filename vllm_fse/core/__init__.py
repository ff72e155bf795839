"""The family-neutral FSE core: the decision, the widened layer and its op, construction,
weight loading, the plan line and the model mixin (see docs/design.md)."""
