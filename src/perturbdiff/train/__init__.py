"""perturbdiff.train"""
