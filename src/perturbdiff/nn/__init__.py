"""perturbdiff.nn"""
