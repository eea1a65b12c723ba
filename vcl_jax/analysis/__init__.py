"""Tools that read finished runs: sampling and rescoring a checkpoint, VCL's weight
diagnostics, the rank-1 paper's Fisher analysis, and the aggregation of several seeds."""
