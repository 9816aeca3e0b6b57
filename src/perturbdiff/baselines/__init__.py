"""perturbdiff.baselines"""
