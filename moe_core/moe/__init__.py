"""The MoE layer, one concept per module: router, dispatch, experts, balance, stats, layer."""
