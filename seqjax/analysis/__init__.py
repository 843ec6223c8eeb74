"""Tools that compare and dissect trained networks: representational similarity (CKA), unit matching across
networks, interaction bases, criticality diagnostics and exact-permutation ensembles.

Each function takes parameters or activations (plain arrays) of any seqjax model; nothing here trains.
"""
