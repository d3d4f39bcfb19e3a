"""What a step costs on a profile: the layout (layout.py), per-operator FLOP and byte terms
(terms.py), shape-aware efficiency (efficiency.py), collectives on the topology (interconnect.py),
MoE routing (routing.py), and the CostModel that prices a step from them (model.py)."""
